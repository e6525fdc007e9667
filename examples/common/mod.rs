//! What the benchmark and the soak run share: the simulator and the gateway started as
//! separate processes from the release build, and their figures read from `/proc`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A process under measurement; killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds used so far by the process and its children (nginx workers).
    pub fn cpu_seconds(&self) -> f64 {
        let ticks = |pid: u32| -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                    Some(
                        fields.get(11)?.parse::<u64>().ok()?
                            + fields.get(12)?.parse::<u64>().ok()?,
                    )
                })
                .unwrap_or(0)
        };
        let pid = self.pid();
        let children: u64 = children(pid).into_iter().map(ticks).sum();
        (ticks(pid) + children) as f64 / 100.0
    }

    /// Resident memory of the process and its children, in MiB.
    pub fn rss_mib(&self) -> f64 {
        let pid = self.pid();
        let total: u64 = status_field(pid, "VmRSS:")
            + children(pid)
                .into_iter()
                .map(|child| status_field(child, "VmRSS:"))
                .sum::<u64>();
        total as f64 / 1024.0
    }

    pub fn threads(&self) -> u64 {
        status_field(self.pid(), "Threads:")
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(Iterator::count)
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // nginx's worker outlives a master killed with SIGKILL: it is killed after it (a
        // master still alive would start another).
        let children = children(self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A number from a `/proc/<pid>/status` line (`VmRSS:` is in KiB).
fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn wait_for(url: &str) -> anyhow::Result<()> {
    // A minute: a gateway on a store of a million keys is measured from its start.
    for _ in 0..3000 {
        if reqwest::get(url).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{url} never answered")
}

/// The gateway binary beside the running example.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/examples/<example> → target/<profile>/step3-gateway
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("step3-gateway"))
        .unwrap_or_else(|| PathBuf::from("step3-gateway"))
}

/// Runs `program`, pinned to `cpu` when one is given and `taskset` exists.
pub fn pinned(cpu: Option<&str>, program: &Path) -> Command {
    match cpu {
        Some(cpu) if Path::new("/usr/bin/taskset").exists() => {
            let mut command = Command::new("/usr/bin/taskset");
            command.args(["-c", cpu]).arg(program);
            command
        }
        _ => Command::new(program),
    }
}

/// The simulator and a gateway in front of it, on a data dir in `dir`.
pub struct Servers {
    pub upstream: Proc,
    pub upstream_url: String,
    pub gateway: Proc,
    pub gateway_url: String,
    /// The gateway's config file, to start it again.
    pub config: PathBuf,
    pub data_dir: PathBuf,
    /// From the gateway's start to its first answer on `/health`.
    pub start_up: Duration,
}

/// Starts the simulator (`token_latency_ms` per token) and the gateway (admin token
/// `admin`, logs at `warn`) with its store in `dir/data`.
pub async fn start_servers(
    dir: &Path,
    cpu: Option<&str>,
    token_latency_ms: u64,
    admin: &str,
) -> anyhow::Result<Servers> {
    let sim_port = free_port()?;
    let upstream = Proc {
        child: pinned(cpu, &binary())
            .args([
                "simulate",
                "--listen",
                &format!("127.0.0.1:{sim_port}"),
                "--token-latency-ms",
                &token_latency_ms.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "start the simulator (build with `cargo build --release --bins --examples`)",
            )?,
    };
    let upstream_url = format!("http://127.0.0.1:{sim_port}");
    wait_for(&format!("{upstream_url}/health")).await?;

    let gw_port = free_port()?;
    let data_dir = dir.join("data");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{gw_port}\"\n[upstream]\nurl = \"{upstream_url}\"\n\
             [store]\npath = \"{}\"\n[admin]\ntoken = \"{admin}\"\n[log]\nlevel = \"warn\"\n",
            data_dir.display()
        ),
    )?;
    let gateway_url = format!("http://127.0.0.1:{gw_port}");
    let (gateway, start_up) = start_gateway(cpu, &config, &gateway_url).await?;
    Ok(Servers {
        upstream,
        upstream_url,
        gateway,
        gateway_url,
        config,
        data_dir,
        start_up,
    })
}

/// Starts the gateway on `config` and waits until it answers at `url`; returns it and the
/// time that took.
pub async fn start_gateway(
    cpu: Option<&str>,
    config: &Path,
    url: &str,
) -> anyhow::Result<(Proc, Duration)> {
    let starting = Instant::now();
    let gateway = Proc {
        child: pinned(cpu, &binary())
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    };
    wait_for(&format!("{url}/health")).await?;
    Ok((gateway, starting.elapsed()))
}
