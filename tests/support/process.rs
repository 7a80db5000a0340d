//! The built `keel` binary as a child process on ephemeral ports, for tests
//! that need real signals. Addresses are read from the startup log line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct KeelProcess {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    /// Reads stdout until the process closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl KeelProcess {
    /// Starts `keel serve` with loopback ephemeral ports and `env` on top,
    /// and waits for its "keel serving" line.
    pub fn start(env: &[(&str, &str)]) -> Result<Self> {
        let empty_dir = std::env::temp_dir().join(format!("keel-proc-{}", std::process::id()));
        std::fs::create_dir_all(&empty_dir)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .arg("serve")
            .env_clear()
            .env("KEEL_CONFIG_DIR", &empty_dir)
            .env("KEEL__GRPC__ADDR", "127.0.0.1:0")
            .env("KEEL__HTTP__ADDR", "127.0.0.1:0")
            .env("KEEL__ADMIN__ADDR", "127.0.0.1:0")
            .env("KEEL__LOG__FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().context("cannot start keel")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<BTreeMap<String, String>>();
        let reader = {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(record) = serde_json::from_str::<serde_json::Value>(&line)
                        && record["message"] == "keel serving"
                    {
                        let addrs = ["grpc.addr", "http.addr", "admin.addr"]
                            .iter()
                            .filter_map(|k| record[*k].as_str().map(|v| ((*k).to_owned(), v.to_owned())))
                            .collect();
                        let _ = ready_tx.send(addrs);
                    }
                    if let Ok(mut logs) = logs.lock() {
                        logs.push(line);
                    }
                }
            })
        };
        let addrs = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                bail!("keel did not report serving within 30s");
            }
        };
        let addr = |key: &str| -> Result<SocketAddr> { Ok(addrs.get(key).context("address missing")?.parse()?) };
        Ok(Self {
            grpc: addr("grpc.addr")?,
            http: addr("http.addr")?,
            admin: addr("admin.addr")?,
            child,
            logs,
            reader: Some(reader),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, `QUIT`, `HUP`) with kill(2), as an operator
    /// or the kubelet would. Not the `kill` program: a minimal machine may
    /// lack procps.
    #[allow(unsafe_code)] // kill(2) has no safe wrapper in std.
    pub fn signal(&self, name: &str) -> Result<()> {
        let number = match name {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "QUIT" => libc::SIGQUIT,
            "HUP" => libc::SIGHUP,
            other => bail!("unsupported signal {other}"),
        };
        let pid = libc::pid_t::try_from(self.pid())?;
        // SAFETY: kill(2) only sends a signal to our own child process.
        let result = unsafe { libc::kill(pid, number) };
        anyhow::ensure!(result == 0, "kill({pid}, SIG{name}) failed: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Waits for the process to exit, up to `bound`.
    pub fn wait_exit(&mut self, bound: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("keel did not exit within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Every line the process wrote, once it has exited and closed stdout.
    pub fn all_logs(&mut self) -> Result<Vec<String>> {
        if let Some(reader) = self.reader.take() {
            reader.join().map_err(|_| anyhow::anyhow!("the log reader panicked"))?;
        }
        Ok(self.logs())
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for KeelProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
