"""Runs every command of the README's examples against the built binary, so
an example that no longer works fails CI.

The ```sh blocks of the sections named in SECTIONS are read, `\\`
continuations joined, and each command run with bash in one shell per
section (so `id=$(...)` captured by one command is seen by the next), in
README order, against one server started on ephemeral ports. The only
rewrites, each printed:
  - localhost:9000 / :8080 / :8081 become the server's real addresses;
  - waits are capped (grpcurl `-max-time N`, a `grpc-timeout: NS` header)
    to CAP_SECONDS, so the watch examples end quickly;
  - `curl` gets `-f -S`, so an HTTP error status fails the command.
A command fails when it exits non-zero (other than an exit code listed in
EXPECTED_EXIT for it) or when a curl answer that should be JSON is not.
Unquoted URLs with `?` are rejected too: zsh would glob them."""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

from keelproc import Checks, Keel

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/debug/keel"
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
SECTIONS = ["Talking to it", "The HTTP gateway"]
CAP_SECONDS = 2
# Commands that end by design with a non-zero exit code: grpcurl exits with
# 64 + the gRPC status code, so a watch cut by its own -max-time gives 68
# (DEADLINE_EXCEEDED). Keyed by a substring of the command.
EXPECTED_EXIT = {"user.v1.UserService/WatchUsers": {68}}
# Output a command must contain (after the rewrites), keyed the same way.
EXPECTED_OUTPUT = {"v1/users:watch": '"code":4'}
BLOCK_TIMEOUT = 120

check = Checks("readme acceptance")


def sections(text):
    """{heading: body} for every `## heading`."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^##\s+(.*?)\s*$", line)
        if m:
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = m.group(1), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out


def commands(body):
    """Shell commands of the ```sh blocks, continuations joined."""
    out = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", body, re.S | re.M):
        current = ""
        for line in block.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1].rstrip() + " "
                continue
            current += line.strip() if current else line.rstrip()
            out.append(current)
            current = ""
        if current:
            out.append(current.strip())
    return out


def unquoted_globs(command):
    """Words with a `?` outside quotes: zsh would glob them (a URL's query)."""
    bad, word, quote, unquoted_q = [], "", None, False
    for ch in command + " ":
        if quote:
            word += ch
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            word += ch
        elif ch.isspace():
            if unquoted_q:
                bad.append(word)
            word, unquoted_q = "", False
        elif ch == "#" and not word:
            break
        else:
            word += ch
            unquoted_q |= ch == "?"
    return bad


def rewrite(command, addrs):
    notes = []
    ports = {"9000": addrs["grpc"], "8080": addrs["http"], "8081": addrs["admin"]}
    command = re.sub(r"\blocalhost:(9000|8080|8081)\b", lambda m: ports[m.group(1)], command)
    capped = re.sub(r"(-max-time\s+)\d+", rf"\g<1>{CAP_SECONDS}", command)
    capped = re.sub(r"(grpc-timeout:\s*)\d+S", rf"\g<1>{CAP_SECONDS}S", capped, flags=re.I)
    if capped != command:
        notes.append(f"wait capped to {CAP_SECONDS}s")
    command = capped
    # `curl` at the start of the command or of a pipeline stage, or in $(...).
    command, n = re.subn(r"(^|[|;&(]\s*)curl\s", r"\1curl -f -S ", command)
    if n:
        notes.append("curl -f -S")
    return command, notes


def looks_like_json(output, command):
    if "text/event-stream" in command:
        return all(line.startswith(("data:", "event:", "id:", ":", "retry:")) for line in output.splitlines() if line)
    try:
        json.loads(output)
        return True
    except ValueError:
        pass
    lines = [line for line in output.splitlines() if line.strip()]
    try:
        for line in lines:
            json.loads(line)
    except ValueError:
        return False
    return bool(lines)


def run_section(name, cmds, keel, workdir):
    """Runs one section's commands in one bash; returns per-command (rc, output)."""
    script = ["set -o pipefail"]
    prepared = []
    for i, original in enumerate(cmds):
        command, notes = rewrite(original, keel.addrs)
        leftover = re.findall(r"\blocalhost:\d+", command)
        prepared.append((original, command, notes, leftover))
        out = os.path.join(workdir, f"{i}.out")
        rc = os.path.join(workdir, f"{i}.rc")
        # Braces, not a subshell: assignments persist into later commands.
        script.append(f"{{\n{command}\n}} >{shlex.quote(out)} 2>&1 </dev/null; echo $? >{shlex.quote(rc)}")
    env = dict(os.environ)
    grpcurl = os.environ.get("GRPCURL")
    if grpcurl:
        env["PATH"] = os.path.dirname(os.path.abspath(grpcurl)) + os.pathsep + env.get("PATH", "")
    try:
        subprocess.run(["bash", "-c", "\n".join(script)], env=env, timeout=BLOCK_TIMEOUT, cwd=workdir)
    except subprocess.TimeoutExpired:
        print(f"FAIL section {name!r} did not finish within {BLOCK_TIMEOUT}s")
    results = []
    for i, (original, command, notes, leftover) in enumerate(prepared):
        try:
            with open(os.path.join(workdir, f"{i}.rc")) as f:
                rc = int(f.read().strip())
        except (OSError, ValueError):
            rc = None
        try:
            with open(os.path.join(workdir, f"{i}.out"), errors="replace") as f:
                output = f.read()
        except OSError:
            output = ""
        results.append((original, command, notes, leftover, rc, output))
    return results


def main():
    with open(README) as f:
        readme = sections(f.read())
    keel = Keel(BINARY)
    try:
        total = 0
        for name in SECTIONS:
            body = readme.get(name)
            check(body is not None, f"README has a section '## {name}'")
            cmds = commands(body or "")
            check(bool(cmds), f"section '{name}' has shell commands")
            total += len(cmds)
            with tempfile.TemporaryDirectory() as workdir:
                for original, command, notes, leftover, rc, output in run_section(name, cmds, keel, workdir):
                    allowed = {0}
                    expected_text = None
                    for key, codes in EXPECTED_EXIT.items():
                        if key in original:
                            allowed = codes
                    for key, text in EXPECTED_OUTPUT.items():
                        if key in original:
                            expected_text = text
                    problems = []
                    if rc is None:
                        problems.append("did not finish")
                    elif rc not in allowed:
                        problems.append(f"exit {rc}, expected {sorted(allowed)}")
                    if leftover:
                        problems.append(f"addresses not rewritten: {leftover}")
                    globs = unquoted_globs(original)
                    if globs:
                        problems.append(f"unquoted {globs}: quote URLs with '?' (zsh globs them)")
                    if rc == 0 and re.match(r"\s*curl\s", original) and not looks_like_json(output, original):
                        problems.append("the answer is not JSON (or NDJSON / SSE)")
                    if expected_text and expected_text not in output.replace(" ", ""):
                        problems.append(f"output lacks {expected_text}")
                    label = original if not notes else f"{original}   [{', '.join(notes)}]"
                    check(not problems, label)
                    if problems:
                        print("     ran:    " + command)
                        print("     problem: " + "; ".join(problems))
                        print("     output:\n" + "\n".join("       " + line for line in output.splitlines()[-30:]))
        check(total >= 10, f"{total} README commands ran")
    finally:
        code, _ = keel.stop()
        check(code == 0, f"server exit code {code} after the README commands")
    check.finish()


if __name__ == "__main__":
    main()
