//! A private Postgres for the shared-store tests: one server per test binary run, started
//! on first use (`initdb` into a temporary directory, a free port, `fsync=off`), and a fresh
//! database for each test, so tests stay independent and run in parallel. A watcher
//! process stops the server and removes its directory when the test binary exits, however
//! it exits. `scripts/test.sh` installs Postgres when it is missing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The server's superuser; the tests connect over TCP with `trust` authentication.
const USER: &str = "postgres";

struct Server {
    port: u16,
    bin: PathBuf,
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The URL of a new, empty database on the test run's Postgres.
pub fn fresh_database() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let server = SERVER.get_or_init(start);
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    run(
        Command::new(server.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
            .args(["-U", USER, &name]),
        "createdb",
    );
    format!("postgres://{USER}@127.0.0.1:{}/{name}", server.port)
}

/// Postgres's programs: the newest version under /usr/lib/postgresql (Debian), else PATH.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .or_else(|| {
            let out = Command::new("pg_config").arg("--bindir").output().ok()?;
            Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
        })
        .filter(|bin| bin.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!("Postgres (initdb) not found: run scripts/test.sh, which installs it")
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// `program` as the `postgres` user when we are root (Postgres refuses to run as root).
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", USER, "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Server {
    let own = OwnPostgres::start();
    watch(&own.bin, &own.dir, &own.dir.join("data"));
    let server = Server {
        port: own.port,
        bin: own.bin.clone(),
    };
    // Stopped and removed by the watcher when the test binary exits.
    std::mem::forget(own);
    server
}

/// A Postgres of one test's own, for tests that stop it: one database, `books`, made at
/// start. Stopped and removed when dropped.
pub struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    pub url: String,
}

impl OwnPostgres {
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("step3gw-pg-")
            .tempdir()
            .unwrap()
            .keep();
        if is_root() {
            run(
                Command::new("chown").args(["-R", USER]).arg(&dir),
                "chown the Postgres directory",
            );
        }
        run(
            as_owner(&bin.join("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args(["-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"]),
            "initdb",
        );
        let port = free_port();
        let own = OwnPostgres {
            url: format!("postgres://{USER}@127.0.0.1:{port}/books"),
            bin,
            dir,
            port,
        };
        own.resume();
        run(
            Command::new(own.bin.join("createdb")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                USER,
                "books",
            ]),
            "createdb",
        );
        own
    }

    fn pg_ctl(&self) -> Command {
        let mut command = as_owner(&self.bin.join("pg_ctl"));
        command.arg("-D").arg(self.dir.join("data"));
        command
    }

    /// Stops the server (fast: connections are cut).
    pub fn pause(&self) {
        run(
            self.pg_ctl().args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Starts it (again) on its port.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        run(
            self.pg_ctl()
                .args(["-o", &options, "-l"])
                .arg(self.dir.join("log"))
                .args(["-w", "start"])
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the server and removes its directory once this test process has ended.
fn watch(bin: &Path, dir: &Path, data: &Path) {
    watch_for_exit(&format!(
        "{runuser}'{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
        runuser = if is_root() {
            "runuser -u postgres -- "
        } else {
            ""
        },
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display(),
    ));
}

/// Runs the shell command `cleanup` once this test process has ended: from a detached
/// shell (started in the background by a shell that exits at once) that waits for it.
pub fn watch_for_exit(cleanup: &str) {
    let watcher = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {cleanup}",
        pid = std::process::id(),
    );
    let status = Command::new("sh")
        .args([
            "-c",
            "setsid sh -c \"$0\" </dev/null >/dev/null 2>&1 &",
            &watcher,
        ])
        .status()
        .unwrap();
    assert!(status.success(), "the watcher did not start");
}

/// Runs `sql` in the database at `url` (one of [`fresh_database`]'s) with `psql`.
pub fn psql(url: &str, sql: &str) -> String {
    let server = SERVER.get_or_init(start);
    let out = Command::new(server.bin.join("psql"))
        .args(["-v", "ON_ERROR_STOP=1", "-tA", url, "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
