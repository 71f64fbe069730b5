//! A real `redis-server` for the Redis engine's tests (SPEC §15): started on a free loopback
//! port with a data directory of its own, stopped by PID.
//!
//! Persistence is on (`--appendonly yes --appendfsync always`), so `restart` keeps everything
//! Redis acknowledged, as a production Redis with AOF would: the tests check that wsrelay loses
//! nothing it acked across a Redis restart, not that Redis itself is durable.
//!
//! Every wait is bounded by a deadline on an observable event (PING answered, the process
//! gone); nothing sleeps to synchronise.

use crate::support::DEADLINE;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a test that needs Redis can run. Without `redis-server` on the PATH it says so in one
/// line and the test passes without running, unless `WSRELAY_REQUIRE_REDIS` is set
/// (`./scripts/test` and CI set it): then a missing Redis fails the test instead of hiding it.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("WSRELAY_REQUIRE_REDIS").is_none(),
            "redis-server is not installed, and WSRELAY_REQUIRE_REDIS says it must be"
        );
        eprintln!("skipped: redis-server is not installed (WSRELAY_REQUIRE_REDIS unset)");
    }
    found
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` on a free 127.0.0.1 port and waits (bounded) until it answers PING.
    pub fn start() -> RedisServer {
        let mut dir = tempfile::tempdir().expect("tempdir for redis");
        // The port is free now; another process could take it before redis binds it, in which
        // case redis exits and `spawn` tries a new one.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut server = RedisServer {
                child: None,
                port,
                dir,
            };
            if server.spawn() {
                return server;
            }
            dir = server.take_dir();
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The URL wsrelay's `--redis` takes.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Runs the server process and waits until it answers; false if it exited first (the
    /// port was taken).
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if self.ping() {
                return true;
            }
            if let Some(child) = &mut self.child {
                if child.try_wait().expect("try_wait").is_some() {
                    self.child = None;
                    return false;
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not answer PING within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(10)); // poll interval, not a synchronisation
        }
    }

    fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let con = client.get_connection_with_timeout(Duration::from_secs(1))?;
        con.set_read_timeout(Some(DEADLINE))?;
        Ok(con)
    }

    fn ping(&self) -> bool {
        self.connection()
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok_and(|pong| pong == "PONG")
    }

    /// One command, e.g. `cli(&["XLEN", "k"])`.
    pub fn cli(&self, args: &[&str]) -> redis::Value {
        let mut con = self.connection().expect("connect to the test redis");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut con)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Closes every PUB/SUB connection from the Redis side (`CLIENT KILL TYPE pubsub`), as a
    /// proxy or a failover would. Returns how many were closed.
    pub fn kill_pubsub(&self) -> i64 {
        match self.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]) {
            redis::Value::Int(n) => n,
            other => panic!("CLIENT KILL answered {other:?}"),
        }
    }

    /// Stops the server (SIGTERM: with AOF and `appendfsync always` nothing acknowledged is
    /// lost) and waits until the process is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            wait_gone(&mut child);
        }
    }

    /// Freezes the server (SIGSTOP): its connections stay open and silent, the failure a
    /// health check on the connection alone would miss. `resume` thaws it.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Starts it again on the same port and directory (what it persisted is back).
    pub fn restart(&mut self) {
        self.stop();
        assert!(self.spawn(), "redis-server did not restart on its port");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            wait_gone(&mut child);
        }
    }
}

fn wait_gone(child: &mut Child) {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(10)); // poll interval, not a synchronisation
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn the_harness_starts_restarts_and_stops_redis() {
    if !redis_available() {
        return;
    }
    let mut redis = RedisServer::start();
    redis.cli(&["SET", "kept", "1"]);
    redis.restart();
    // appendfsync always: what was acknowledged survives the restart.
    assert_eq!(
        redis.cli(&["GET", "kept"]),
        redis::Value::BulkString(b"1".to_vec())
    );
    assert_eq!(redis.kill_pubsub(), 0);
    redis.stop();
    assert!(!redis.ping(), "stopped redis still answers");
    assert!(redis.data_dir().exists());
}
