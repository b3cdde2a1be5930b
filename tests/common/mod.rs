//! Shared harness for the integration tests: each test gets its own temporary directory,
//! config, sled state and port; it drives the real `tidemark` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidemark"))
}

/// Repository root (for `ops/` scripts).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A test's private world: a temporary directory with `src/`, `dst/`, `state/` and a config.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Env {
    /// A directory-to-directory pipeline named `t` with the given extra pipeline keys
    /// (TOML lines placed in the `[[pipeline]]` table) and target keys.
    pub fn dirs(pipeline_extra: &str, target_extra: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src")).unwrap();
        let config = dir.path().join("tidemark.toml");
        let env = Env { dir, config };
        let interval = if pipeline_extra.contains("scan_interval") {
            ""
        } else {
            "scan_interval = \"200ms\""
        };
        env.write_config(&format!(
            r#"state_dir = "state"
listen = "127.0.0.1:0"
shutdown_timeout = "20s"

[[pipeline]]
name = "t"
{interval}
{pipeline_extra}

[pipeline.source.dir]
path = "src"

[pipeline.target.dir]
path = "dst"
{target_extra}
"#
        ));
        env
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The finished report directories of `pipeline` under `state/reports`, oldest first.
    /// A report being written sits in a hidden directory until both its files are
    /// complete, so a test reading reports while a daemon runs must leave those out.
    pub fn report_dirs(&self, pipeline: &str) -> Vec<PathBuf> {
        let base = self.path("state/reports").join(pipeline);
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&base)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        // `{stamp}` then `{stamp}-1`, `{stamp}-2`, … `{stamp}-10` in the order written.
        dirs.sort_by_key(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let (stamp, n) = name.split_once('-').unwrap_or((name.as_str(), "0"));
            (stamp.to_owned(), n.parse::<u64>().unwrap_or(0))
        });
        dirs
    }

    pub fn src(&self) -> PathBuf {
        self.path("src")
    }

    pub fn dst(&self) -> PathBuf {
        self.path("dst")
    }

    /// A command for the binary with this env's config.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.arg("--config").arg(&self.config).args(args);
        c.env("RUST_LOG", "tidemark=debug,info");
        c
    }

    /// Runs the binary to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("tidemark runs")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tidemark {args:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with `--output json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("stdout is JSON")
    }

    /// `sync --output json` for pipeline `t`: (scan record, project report).
    pub fn sync(&self) -> (serde_json::Value, serde_json::Value) {
        let v = self.json(&["sync"]);
        (v[0]["scan"].clone(), v[0]["project"].clone())
    }

    /// Syncs `old/x.txt`, puts `old/stray.txt` on the target by hand and deletes `old`
    /// from the source: the sync after leaves the delete of `old` waiting for good.
    #[allow(dead_code)]
    pub fn leave_a_directory_delete_waiting(&self) {
        write(self.src().join("old/x.txt"), "x");
        self.sync();
        write(self.dst().join("old/stray.txt"), "not from the source");
        std::fs::remove_dir_all(self.src().join("old")).unwrap();
        self.sync_leaving_directories(1);
    }

    /// [`Env::sync`] for a run that leaves directory deletes waiting for their
    /// directories to be emptied on the target, which exits 3 and counts them.
    #[allow(dead_code)]
    pub fn sync_leaving_directories(&self, waiting: u64) -> (serde_json::Value, serde_json::Value) {
        let out = self.run(&["sync", "--output", "json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is JSON");
        assert_eq!(v[0]["directories_waiting"], waiting, "{v}");
        (v[0]["scan"].clone(), v[0]["project"].clone())
    }

    /// Starts `tidemark run` with stderr captured to `daemon.log` (appended).
    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(self.cmd(&["run"]))
    }

    /// [`Env::spawn_daemon`] with `run`, a command for `tidemark run` set up otherwise
    /// (as another user).
    pub fn spawn_daemon_with(&self, mut run: Command) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        // One a killed daemon left is removed before the new one starts: removed after,
        // it could be the new daemon's, written already, and the wait below ran out.
        let addr_file = self.path("state/listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let child = run
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tidemark run starts");
        let addr = wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&addr_file)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| panic!("daemon did not start; log:\n{}", self.daemon_log()));
        Daemon { child, addr }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }

    /// How many lines of `daemon.log` at `level` (`ERROR`, `WARN`, `INFO`, `DEBUG`) hold
    /// `what`.
    pub fn log_lines(&self, level: &str, what: &str) -> usize {
        self.daemon_log()
            .lines()
            .filter(|l| l.contains(level) && l.contains(what))
            .count()
    }
}

/// A running `tidemark run`.
pub struct Daemon {
    pub child: Child,
    pub addr: String,
}

impl Daemon {
    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        reqwest::blocking::get(format!("http://{}{path}", self.addr)).expect("endpoint answers")
    }

    /// Scrapes `/metrics` into `name{labels}` → value.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        parse_metrics(&self.get("/metrics").text().unwrap())
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.metrics().get(series).copied().unwrap_or(f64::NAN)
    }

    /// Waits until `/status` says the projector of the first pipeline retries, past
    /// `attempts` failed attempts; returns its `projector_retrying`.
    pub fn retrying_past(&self, attempts: u64, env: &Env) -> serde_json::Value {
        wait_for(Duration::from_secs(60), || {
            let v: serde_json::Value = self.get("/status").json().ok()?;
            let r = v[0]["projector_retrying"].clone();
            (r["attempts"].as_u64()? > attempts).then_some(r)
        })
        .unwrap_or_else(|| panic!("no retrying in /status; log:\n{}", env.daemon_log()))
    }

    /// Waits until `/status` says the first pipeline is caught up, its projector retrying
    /// no more.
    pub fn caught_up(&self, env: &Env) {
        wait_for(Duration::from_secs(60), || {
            let v: serde_json::Value = self.get("/status").json().ok()?;
            (v[0]["lag_events"] == 0 && v[0]["projector_retrying"].is_null()).then_some(())
        })
        .unwrap_or_else(|| panic!("the retrying did not end; log:\n{}", env.daemon_log()))
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop_with(mut self, sig: &str) -> std::process::ExitStatus {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit after SIG{sig}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes of the files below `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_size(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// Writes a file, creating parents.
/// Makes a named pipe, a special file a scan skips.
pub fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

pub fn write(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) {
    let path = path.as_ref();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The note a directory target keeps of the state that last wrote it, and its directory.
pub const WRITER_NOTE: [&str; 2] = [".tidemark-tmp", ".tidemark-tmp/written-by"];

/// Every entry below `root` but the target's writer note ([`WRITER_NOTE`]; any other
/// debris in `.tidemark-tmp` counts): relative path bytes → (type, mode, content). Two
/// trees are equal mirrors when their snapshots are equal.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, (char, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        if WRITER_NOTE.iter().any(|n| n.as_bytes() == rel) {
            continue;
        }
        let meta = entry.path().symlink_metadata().unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let value = if meta.is_dir() {
            ('d', mode, vec![])
        } else if meta.file_type().is_symlink() {
            (
                'l',
                0,
                std::fs::read_link(entry.path())
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else {
            ('f', mode, std::fs::read(entry.path()).unwrap())
        };
        out.insert(rel, value);
    }
    out
}

/// Every entry below the directory target `root`, its `.tidemark-tmp` (tidemark's
/// scratch directory and writer note) left out.
pub fn walk_target(root: &Path) -> impl Iterator<Item = walkdir::DirEntry> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !(e.depth() == 1 && e.file_name() == WRITER_NOTE[0]))
        .map(|e| e.unwrap())
}

/// How many entries the directory `dir` holds, a target's `.tidemark-tmp` left out.
pub fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != WRITER_NOTE[0])
        .count()
}

/// Asserts `dst` mirrors `src` exactly, naming the first differences.
pub fn assert_mirror(src: &Path, dst: &Path) {
    let a = snapshot(src);
    let b = snapshot(dst);
    if a != b {
        let show = |k: &Vec<u8>| String::from_utf8_lossy(k).into_owned();
        let missing: Vec<String> = a
            .keys()
            .filter(|k| !b.contains_key(*k))
            .map(show)
            .take(10)
            .collect();
        let extra: Vec<String> = b
            .keys()
            .filter(|k| !a.contains_key(*k))
            .map(show)
            .take(10)
            .collect();
        let differ: Vec<String> = a
            .iter()
            .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
            .map(|(k, _)| show(k))
            .take(10)
            .collect();
        panic!("target is not a mirror of source: missing {missing:?}, extra {extra:?}, different {differ:?}");
    }
}

/// Runs `plan` for pipeline `t` and asserts it shows exactly one event kept waiting:
/// `retry <kind> <key>` with the time it started waiting, or, for an item that failed
/// in an earlier run, the time and reason of its failure. Returns the plan.
pub fn assert_plan_retries(env: &Env, kind_key: &str) -> String {
    let plan = env.ok(&["plan"]);
    let wanted = format!("retry {kind_key} ");
    let line = plan
        .lines()
        .find(|l| l.trim_start().starts_with(&wanted))
        .unwrap_or_else(|| panic!("plan does not show `{kind_key}` waiting:\n{plan}"));
    assert!(
        line.contains("waiting since") || line.contains(", failed "),
        "{plan}"
    );
    assert!(plan.contains("t: plan: 1 retry"), "{plan}");
    plan
}

/// Counts of an outcome in a project report (`sync` JSON).
pub fn outcome(report: &serde_json::Value, name: &str) -> u64 {
    report["outcomes"][name].as_u64().unwrap_or(0)
}

/// Counts of an outcome for one kind in a project report.
pub fn kind_outcome(report: &serde_json::Value, kind: &str, name: &str) -> u64 {
    report["by_kind"][kind][name].as_u64().unwrap_or(0)
}

/// How to start the broker the Kafka tests need.
pub const KAFKA_HINT: &str =
    "start one with `export TIDEMARK_KAFKA_BROKERS=$(ops/peers/kafka.sh start)`";

/// Bootstrap address of the test broker from `TIDEMARK_KAFKA_BROKERS`; fails the test,
/// naming the command that starts one, when it is unset or does not answer.
pub fn kafka_brokers() -> String {
    let brokers = std::env::var("TIDEMARK_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!("TIDEMARK_KAFKA_BROKERS is not set: the Kafka tests need a broker; {KAFKA_HINT}")
    });
    assert!(
        tcp_answers(brokers.split(',').next().unwrap_or("").trim()),
        "the Kafka broker {brokers} (TIDEMARK_KAFKA_BROKERS) does not answer; {KAFKA_HINT}"
    );
    brokers
}

/// Whether something accepts TCP connections at `host:port`.
pub fn tcp_answers(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)).is_ok())
}

/// A name no other test (or earlier run) uses, for Kafka topics and groups.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A `[pipeline.log.kafka]` table (to end a `pipeline_extra`) on `topic` and `group`.
pub fn kafka_log_section(brokers: &str, topic: &str, group: &str, partitions: u32) -> String {
    format!(
        "\n[pipeline.log.kafka]\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\ngroup = \"{group}\"\npartitions = {partitions}\nsession_timeout = \"6s\"\n"
    )
}

/// Runs an `ops/` script with arguments and returns its stdout; panics with its stderr.
pub fn ops(script: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{script} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether `dst` mirrors `src` right now; false (not a panic) while a writer is still
/// changing `dst` under the walk.
pub fn mirrors_now(src: &Path, dst: &Path) -> bool {
    std::panic::catch_unwind(|| snapshot(src) == snapshot(dst)).unwrap_or(false)
}

/// xorshift: reproducible randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Deterministic pseudo-random bytes, so binary content is reproducible.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed.max(1));
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Offsets of the `applied` debug lines (one per change written) in a daemon log.
pub fn applied_offsets(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("applied") && l.contains("outcome="))
        .filter_map(|l| {
            let rest = &l[l.find(" offset=")? + 8..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

// Progress bars: the binary under a pseudo-terminal (util-linux `script`).

/// Columns of the pseudo-terminal: wide enough that no log line wraps.
pub const COLS: usize = 250;

/// Runs the binary with `args` under a pseudo-terminal; returns everything it drew.
pub fn under_pty(env: &Env, args: &str) -> String {
    under_pty_logging(env, args, "warn")
}

/// [`under_pty`] with `RUST_LOG` set to `log`.
pub fn under_pty_logging(env: &Env, args: &str, log: &str) -> String {
    let cmd = format!(
        "stty cols {COLS} rows 50; {} --config {} {args}",
        bin().display(),
        env.config.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("RUST_LOG", log)
        .env("TERM", "xterm")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `script` ({e}); install util-linux: apt-get install -y util-linux")
        });
    assert!(
        out.status.success(),
        "tidemark {args} under a pty failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The counts in every frame `drawn` of the bar named `what` (`1,234`, or `1,234/1,530`).
pub fn counts(drawn: &str, what: &str) -> Vec<u64> {
    drawn
        .match_indices(&format!("{what:>10} "))
        .flat_map(|(at, m)| {
            let frame = &drawn[at + m.len()..];
            // Up to the rate (`28,405/s`), which is no count.
            let rate = frame.find("/s").unwrap_or(frame.len());
            let frame = &frame[..frame[..rate].rfind(' ').unwrap_or(rate)];
            frame
                .split_whitespace()
                .filter(|t| {
                    t.chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == '/')
                })
                .flat_map(|t| t.split('/'))
                .filter_map(|n| n.replace(',', "").parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// How to get the exFAT filesystem the exFAT tests need.
pub const EXFAT_HINT: &str = "they need root, /dev/fuse and a free loop device; `ops/peers/exfat.sh install` installs exfat-fuse and exfatprogs, and `ops/peers/exfat.sh mount DIR` shows why a mount fails";

/// An exFAT filesystem mounted at a path (`ops/peers/exfat.sh mount`, exfat-fuse on a loop
/// device) while it lives: unmounted, detached and its image removed when dropped. Fails
/// the test, naming the command to look at, when it cannot be mounted.
pub struct Exfat {
    at: PathBuf,
}

impl Exfat {
    /// Mounts a fresh exFAT filesystem at `at` (made if missing).
    pub fn mount(at: &Path) -> Exfat {
        let script = repo_root().join("ops/peers/exfat.sh");
        let out = Command::new(&script)
            .arg("mount")
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("{} cannot run: {e}; {EXFAT_HINT}", script.display()));
        assert!(
            out.status.success(),
            "cannot mount an exFAT filesystem at {}: {}; {EXFAT_HINT}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Exfat { at: at.to_owned() }
    }
}

impl Drop for Exfat {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("ops/peers/exfat.sh"))
            .arg("umount")
            .arg(&self.at)
            .status();
    }
}
