//! Harness for the end-to-end tests: the real `cloud-hypervisor` binary, the real `/dev/kvm`,
//! the project's own test guest (`guest/`) and, in the slow tier, a stock Debian kernel.
//!
//! - [`Vmm`] spawns the VMM, collects its stdout (our serial console with `--serial tty`) and
//!   stderr in background threads, waits for markers and for the exit, and kills the process on
//!   drop so that no test ever leaves a VMM behind.
//! - [`test_guest`] builds the test guest once per test binary and returns its path.
//! - [`require_kvm!`] skips a test loudly when `/dev/kvm` cannot be used.
//! - [`kvm_serial_guard`] serializes guest boots across all test binaries: every vCPU under
//!   this machine's CPL0 emulation occupies a host core, and there are only two.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub mod bench;
pub mod etcd;
pub mod ft;
pub mod linux_guest;

/// Serial marker the test guest prints when its kernel part is up.
pub const GUEST_READY: &str = "TANDEM-GUEST READY";
/// Serial marker the test guest prints right before it shuts the machine down.
pub const GUEST_DONE: &str = "TANDEM-GUEST DONE";
/// Markers the test guest prints when it detects a failure; waiting stops at once on these.
pub const GUEST_FAILURE_MARKERS: [&str; 2] = ["TANDEM-GUEST FAULT", "TANDEM-GUEST PANIC"];

/// A failed harness step, with enough context to understand the failure from the test log.
pub struct Error(String);

// Debug prints the message as is, so that `expect()` shows readable multi-line diagnostics.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// Writes straight to the process's stderr, bypassing libtest's output capture, so that skips
/// and measurements show up in the log of a passing run too.
pub fn report(line: &str) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{line}");
    let _ = stderr.flush();
}

// ---------------------------------------------------------------------------------------------
// Paths and builds
// ---------------------------------------------------------------------------------------------

/// The repository root (this crate lives in `tests/integration`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The cargo target directory of the main workspace (`CARGO_TARGET_DIR` if set, else `target/`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Scratch space for tests, under the target directory (never in the source tree).
pub fn scratch_dir() -> PathBuf {
    target_dir().join("tmp").join("integration")
}

/// A cargo command for another workspace (the guest) with its own configuration: nothing a
/// surrounding cargo (build script, `cargo test`) sets may leak into it.
fn nested_cargo(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir).args(args);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let leaks = key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key.as_str(),
                "RUSTFLAGS" | "DEBUG" | "OPT_LEVEL" | "PROFILE" | "TARGET" | "HOST" | "NUM_JOBS"
            );
        // Keep where cargo and rustup live.
        if leaks && key != "CARGO_HOME" {
            cmd.env_remove(&key);
        }
    }
    cmd
}

fn run_build(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context(|| format!("{what}: could not start cargo"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return err(format!(
            "{what} failed ({}):\n{}",
            out.status,
            tail_lines(&stderr, 40)
        ));
    }
    Ok(())
}

/// The profile the VMM binary is taken from: `release` when the tests themselves are built
/// optimized, else `debug`. `TANDEM_VMM_PROFILE=release|debug` overrides it.
pub fn vmm_profile() -> String {
    match std::env::var("TANDEM_VMM_PROFILE") {
        Ok(p) if !p.is_empty() => p,
        _ if cfg!(debug_assertions) => "debug".into(),
        _ => "release".into(),
    }
}

/// Path of the `cloud-hypervisor` binary under test: `target/<profile>/cloud-hypervisor`, brought
/// up to date with `cargo build -p cloud-hypervisor` once per test binary (a no-op costing a
/// fraction of a second when `ci/test` or `cargo build` already built it; it keeps `cargo test`
/// after an edit from testing a stale binary). `TANDEM_VMM_BIN` points the tests at another
/// binary and skips the build.
pub fn vmm_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANDEM_VMM_BIN") {
            return Ok(PathBuf::from(bin));
        }
        let profile = vmm_profile();
        let bin = target_dir().join(&profile).join("cloud-hypervisor");
        // Same environment as the outer cargo, so that the build shares its fingerprints.
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(workspace_root())
            .args(["build", "--quiet", "-p", "cloud-hypervisor"])
            .env("CARGO_TARGET_DIR", target_dir());
        if profile == "release" {
            cmd.arg("--release");
        }
        run_build(cmd, "cargo build -p cloud-hypervisor").map_err(|e| e.0)?;
        if !bin.exists() {
            return Err(format!(
                "cargo built the VMM but {} is missing",
                bin.display()
            ));
        }
        Ok(bin)
    })
    .clone()
    .map_err(Error)
}

/// The test guest kernel (`guest/`, its own cargo workspace), built once per test binary.
/// `TANDEM_GUEST` points the tests at a prebuilt guest instead.
pub fn test_guest() -> Result<PathBuf> {
    static GUEST: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("TANDEM_GUEST") {
                return Ok(PathBuf::from(path));
            }
            let dir = workspace_root().join("guest");
            if !dir.join("Cargo.toml").exists() {
                return Err(format!("no test guest sources at {}", dir.display()));
            }
            // Builds of the two workspaces may run from several test binaries at once; cargo's
            // own lock on guest/target serializes them.
            let cmd = nested_cargo(&dir, &["build", "--release"]);
            run_build(cmd, "cargo build --release (guest/)").map_err(|e| e.0)?;
            let bin = dir.join("target/x86_64-unknown-linux-gnu/release/tandem-guest");
            if !bin.exists() {
                return Err(format!(
                    "guest build succeeded but {} is missing",
                    bin.display()
                ));
            }
            Ok(bin)
        })
        .clone()
        .map_err(Error)
}

/// The uncompressed ELF `vmlinux` of the Debian cloud kernel that `ci/fetch-linux` extracts
/// (into the repository's `target/assets/`, whatever `CARGO_TARGET_DIR` says).
/// Runs `ci/fetch-linux` when it is not there yet; failing to get it is an error, not a skip.
pub fn debian_vmlinux() -> Result<PathBuf> {
    let path = workspace_root().join("target/assets/linux/current/vmlinux");
    if path.exists() {
        return Ok(path);
    }
    let _lock = FileLock::acquire("fetch-linux.lock")?;
    if path.exists() {
        return Ok(path);
    }
    let script = workspace_root().join("ci/fetch-linux");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .context(|| format!("could not run {}", script.display()))?;
    if !out.status.success() {
        return err(format!(
            "ci/fetch-linux failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !path.exists() {
        return err(format!(
            "ci/fetch-linux succeeded but {} is missing",
            path.display()
        ));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// KVM availability and serialization of boots
// ---------------------------------------------------------------------------------------------

/// `Ok` when `/dev/kvm` exists and can be opened read-write, else why not.
pub fn kvm_available() -> std::result::Result<(), String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err("/dev/kvm not available".into()),
        Err(e) => Err(format!("/dev/kvm not available ({e})")),
    }
}

/// Set to `1` (`ci/test` does on a root host with `/dev/kvm`) to turn every skip for a missing
/// host prerequisite (KVM, network namespaces, TAP, mount namespaces) into a failure: there, a
/// skip would hide a broken setup.
pub const REQUIRE_KVM_ENV: &str = "TANDEM_REQUIRE_KVM";

/// Whether [`REQUIRE_KVM_ENV`] forbids skipping.
pub fn skipping_forbidden() -> bool {
    std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1")
}

/// Reports that `test` cannot run because `missing` (a host prerequisite) is not there: a loud
/// SKIP line past the output capture, or a panic naming `missing` when
/// [`skipping_forbidden`].
pub fn skip_or_fail(test: &str, missing: &str) {
    if skipping_forbidden() {
        panic!("{test}: {missing}, and {REQUIRE_KVM_ENV}=1 forbids skipping");
    }
    report(&format!("SKIP: {test}: {missing} - this test did NOT run"));
}

/// Body of [`require_kvm!`]: `true` when the test may go on. Otherwise reports a loud SKIP line
/// (or panics when `TANDEM_REQUIRE_KVM=1`, for machines where a skip would hide a problem).
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(why) => {
            skip_or_fail(test, &why);
            false
        }
    }
}

/// The fully qualified name of the enclosing function.
#[macro_export]
macro_rules! function_name {
    () => {{
        fn f() {}
        fn type_name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let name = type_name_of(f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// Returns from the calling test (which then passes) after printing
/// `SKIP: <test>: /dev/kvm not available - this test did NOT run` when KVM cannot be used.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_or_skip($crate::function_name!()) {
            return;
        }
    };
}

/// An exclusive `flock` on a file under `target/tmp/integration/`, released on drop.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(name: &str) -> Result<FileLock> {
        let dir = scratch_dir();
        fs::create_dir_all(&dir).context(|| format!("create {}", dir.display()))?;
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o644)
            .open(&path)
            .context(|| format!("open lock file {}", path.display()))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return err(format!("flock {}: {e}", path.display()));
            }
        }
    }
}

/// Taken by every test that boots a guest: only one guest boots at a time across all test
/// binaries of a run (each emulated vCPU occupies one of the machine's two host cores).
pub fn kvm_serial_guard() -> FileLock {
    FileLock::acquire("kvm-boot.lock").expect("take the KVM boot lock")
}

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

/// A directory under `target/tmp/integration/`, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<TempDir> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = scratch_dir().join(format!("{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).context(|| format!("create {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// The VMM process
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct StreamState {
    text: String,
    closed: bool,
}

/// Text a child writes to one of its pipes, collected by a background thread.
#[derive(Default)]
struct Stream {
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // A poisoned lock only means a reader thread panicked; the text is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pump(self: Arc<Self>, mut from: impl Read + Send + 'static) -> JoinHandle<()> {
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                        self.lock().text.push_str(&chunk);
                        self.changed.notify_all();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            self.lock().closed = true;
            self.changed.notify_all();
        })
    }
}

/// Where a [`Vmm`]'s guest serial console is read from.
enum Console {
    Stdout,
    File(PathBuf),
}

/// A running `cloud-hypervisor` process. Killed (SIGKILL by PID, then reaped) on drop.
pub struct Vmm {
    name: String,
    args: Vec<String>,
    child: Child,
    started: Instant,
    status: Option<ExitStatus>,
    stdout: Arc<Stream>,
    stderr: Arc<Stream>,
    readers: Vec<JoinHandle<()>>,
    console: Console,
    _temp: Option<TempDir>,
}

/// Builder for a [`Vmm`] with Cloud Hypervisor's command-line options.
pub struct VmmBuilder {
    name: String,
    args: Vec<String>,
    console: Console,
    temp: Option<TempDir>,
    program: Option<PathBuf>,
    wrapper: Vec<String>,
    envs: Vec<(String, String)>,
}

impl VmmBuilder {
    /// Appends raw arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn kernel(self, path: &Path) -> Self {
        let p = path.display().to_string();
        self.args(["--kernel", p.as_str()])
    }

    pub fn cmdline(self, cmdline: &str) -> Self {
        self.args(["--cmdline", cmdline])
    }

    pub fn cpus(self, boot: u32) -> Self {
        self.args(["--cpus".to_string(), format!("boot={boot}")])
    }

    pub fn memory(self, size: &str) -> Self {
        self.args(["--memory".to_string(), format!("size={size}")])
    }

    /// Guest serial console on the VMM's stdout, virtio console off.
    pub fn serial_tty(mut self) -> Self {
        self.console = Console::Stdout;
        self.args(["--serial", "tty", "--console", "off"])
    }

    /// Guest serial console into `path`, virtio console off.
    pub fn serial_file(mut self, path: &Path) -> Self {
        self.console = Console::File(path.to_path_buf());
        let arg = format!("file={}", path.display());
        self.args(["--serial", arg.as_str(), "--console", "off"])
    }

    /// Keeps `dir` alive as long as the VMM (removed when the [`Vmm`] is dropped).
    pub fn temp_dir(mut self, dir: TempDir) -> Self {
        self.temp = Some(dir);
        self
    }

    /// Runs the VMM under a wrapper command (e.g. `unshare ...`) that execs its arguments.
    pub fn wrapped_in<I, S>(mut self, wrapper: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.wrapper = wrapper
            .into_iter()
            .map(|a| a.as_ref().to_string())
            .collect();
        self
    }

    /// Sets an environment variable of the VMM process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Uses another program than the VMM under test (for harness self-tests).
    pub fn program(mut self, program: &Path) -> Self {
        self.program = Some(program.to_path_buf());
        self
    }

    pub fn spawn(self) -> Result<Vmm> {
        let program = match self.program {
            Some(p) => p,
            None => vmm_binary()?,
        };
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().context(|| {
            format!(
                "{}: spawn {} {}",
                self.name,
                program.display(),
                self.args.join(" ")
            )
        })?;
        let stdout = Arc::new(Stream::default());
        let stderr = Arc::new(Stream::default());
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(stdout.clone().pump(out));
        }
        if let Some(errs) = child.stderr.take() {
            readers.push(stderr.clone().pump(errs));
        }
        Ok(Vmm {
            name: self.name,
            args: self.args,
            child,
            started,
            status: None,
            stdout,
            stderr,
            readers,
            console: self.console,
            _temp: self.temp,
        })
    }
}

/// What [`Vmm::wait_for`] found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The whole console line that holds the marker.
    pub line: String,
    /// Time from process start to the moment the marker was seen.
    pub after: Duration,
}

impl Vmm {
    /// A VMM with no arguments yet; `name` labels its diagnostics (use the test name).
    pub fn builder(name: &str) -> VmmBuilder {
        VmmBuilder {
            name: name.to_string(),
            args: Vec::new(),
            console: Console::Stdout,
            temp: None,
            program: None,
            wrapper: Vec::new(),
            envs: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since the process was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the VMM wrote to stdout so far (the guest console with `--serial tty`).
    pub fn stdout(&self) -> String {
        self.stdout.lock().text.clone()
    }

    /// Everything the VMM wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().text.clone()
    }

    /// The guest serial console so far: stdout, or the `--serial file=` file.
    pub fn console(&self) -> String {
        match &self.console {
            Console::Stdout => self.stdout(),
            Console::File(path) => fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
                .unwrap_or_default(),
        }
    }

    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Waits until the guest console holds `marker` and returns the line holding it. Fails
    /// early when the guest reports a fault or panic or the VMM exits without printing it.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Found> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if let Some(line) = line_with(&console, marker, false) {
                return Ok(Found {
                    line,
                    after: self.started.elapsed(),
                });
            }
            for failure in GUEST_FAILURE_MARKERS {
                if let Some(line) = line_with(&console, failure, false) {
                    return err(self.diagnose(&format!(
                        "guest reported a failure while waiting for {marker:?}: {line}"
                    )));
                }
            }
            if let Some(status) = self.poll_exit() {
                // Let the readers drain what the process wrote before it exited.
                self.wait_streams_closed(Duration::from_secs(2));
                if let Some(line) = line_with(&self.console(), marker, true) {
                    return Ok(Found {
                        line,
                        after: self.started.elapsed(),
                    });
                }
                return err(
                    self.diagnose(&format!("VMM exited ({status}) before {marker:?} appeared"))
                );
            }
            let now = Instant::now();
            if now >= deadline {
                return err(self.diagnose(&format!(
                    "timed out after {timeout:?} waiting for {marker:?}"
                )));
            }
            // Wake on new stdout, or poll (serial file, exit) every 20 ms.
            let wait = (deadline - now).min(Duration::from_millis(20));
            let guard = self.stdout.lock();
            let _ = self.stdout.changed.wait_timeout(guard, wait);
        }
    }

    /// Waits for the process to exit; on timeout it is left running (and killed on drop).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                self.wait_streams_closed(Duration::from_secs(2));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return err(self.diagnose(&format!("VMM still running after {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the VMM now (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.poll_exit().is_none() {
            // SAFETY: plain kill(2) of our own child's PID, which is not reaped yet (so the PID
            // cannot have been reused).
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL);
            }
            if let Ok(status) = self.child.wait() {
                self.status = Some(status);
            }
        }
        self.wait_streams_closed(Duration::from_secs(2));
    }

    fn wait_streams_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for stream in [&self.stdout, &self.stderr] {
            let mut state = stream.lock();
            while !state.closed {
                let now = Instant::now();
                if now >= deadline {
                    return;
                }
                state = match stream.changed.wait_timeout(state, deadline - now) {
                    Ok((s, _)) => s,
                    Err(p) => p.into_inner().0,
                };
            }
        }
    }

    /// A failure message with the command line and the tails of console and stderr.
    pub fn diagnose(&self, what: &str) -> String {
        let mut msg = format!(
            "{}: {what}\n  command: {} {}\n  after: {:?}",
            self.name,
            vmm_binary()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "cloud-hypervisor".into()),
            self.args.join(" "),
            self.started.elapsed()
        );
        let console = self.console();
        let stderr = self.stderr();
        msg.push_str(&format!(
            "\n  --- guest console (last 30 lines) ---\n{}",
            indent(&tail_lines(&console, 30))
        ));
        msg.push_str(&format!(
            "\n  --- VMM stderr (last 30 lines) ---\n{}",
            indent(&tail_lines(&stderr, 30))
        ));
        msg
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        for reader in self.readers.drain(..) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        if thread::panicking() {
            report(&self.diagnose("test failed; VMM output follows"));
        }
    }
}

/// The first line of `text` that holds `marker`. The serial console arrives byte by byte, so
/// unless `partial_ok` (the writer is gone) only a line already ended by '\n' counts.
fn line_with(text: &str, marker: &str, partial_ok: bool) -> Option<String> {
    let at = text.find(marker)?;
    let start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
    match text[at..].find('\n') {
        Some(len) => Some(text[start..at + len].trim_end().to_string()),
        // Nothing follows the first match, so no later match can be complete either.
        None if partial_ok => Some(text[start..].trim_end().to_string()),
        None => None,
    }
}

pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(n);
    lines[skip..].join("\n")
}

fn indent(text: &str) -> String {
    if text.is_empty() {
        return "    (nothing)".into();
    }
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// Parsing the test guest's markers
// ---------------------------------------------------------------------------------------------

/// `key=value` fields of a marker line (values may be double-quoted).
pub fn marker_fields(line: &str) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find('=') {
        let key_start = rest[..eq]
            .rfind(|c: char| c.is_whitespace())
            .map(|i| i + 1)
            .unwrap_or(0);
        let key = rest[key_start..eq].to_string();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(close) => (&quoted[..close], &quoted[close + 1..]),
                None => (quoted, ""),
            }
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        if !key.is_empty() {
            fields.insert(key, value.to_string());
        }
        rest = next;
    }
    fields
}

// ---------------------------------------------------------------------------------------------
// ch-remote
// ---------------------------------------------------------------------------------------------

/// The `ch-remote` built next to the VMM (`vmm_binary()` builds the whole package).
pub fn ch_remote_binary() -> PathBuf {
    vmm_binary()
        .expect("build the VMM and ch-remote")
        .with_file_name("ch-remote")
}

/// Every address a test VMM or witness listens on for another host: the server certificate of
/// [`tls_dir`] names them all.
const TLS_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    HOST_A,
    HOST_B,
    CLIENT_NET,
    CLIENT_NET_A,
    CLIENT_NET_B,
];

/// Directories [`process_dir`] made, removed when the process exits.
static PROCESS_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_process_dirs() {
    let dirs = std::mem::take(&mut *PROCESS_DIRS.lock().unwrap_or_else(|p| p.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The path of a directory of this process under `parent`, `<prefix><pid>` (not created):
/// those of processes that are gone are removed first (a killed run leaves its own behind),
/// and this one is removed when the process exits.
pub fn process_dir(parent: &Path, prefix: &str) -> PathBuf {
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only asks whether the PID exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = parent.join(format!("{prefix}{}", std::process::id()));
    let mut dirs = PROCESS_DIRS.lock().unwrap_or_else(|p| p.into_inner());
    if dirs.is_empty() {
        // SAFETY: registers a plain function without arguments to run at exit.
        unsafe { libc::atexit(remove_process_dirs) };
    }
    dirs.push(dir.clone());
    dir
}

/// The test CA's credentials (QEMU's x509 layout) that secure every channel between the test
/// hosts, made once per test process by `ci/make-tls-certs`.
pub fn tls_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir(&std::env::temp_dir(), "tandem-tls-");
        let out = Command::new(workspace_root().join("ci/make-tls-certs"))
            .arg(&dir)
            .args(TLS_NAMES)
            .output()
            .expect("run ci/make-tls-certs");
        assert!(
            out.status.success(),
            "ci/make-tls-certs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// As an operator would, the tests secure each channel between hosts with mutual TLS: for a
/// subcommand that opens one over TCP and names no choice itself (`--tls-dir`, `tls_dir=`,
/// `--insecure-plaintext`, `insecure_plaintext=`), [`ch_remote`] adds `--tls-dir` with the
/// test CA's credentials. Tests of the refusals spell their choice out.
fn with_channel_security<'a>(args: &[&'a str]) -> Vec<std::borrow::Cow<'a, str>> {
    const CHANNELS: &[&str] = &[
        "enable-ft",
        "receive-ft",
        "send-migration",
        "receive-migration",
    ];
    let mut out: Vec<std::borrow::Cow<'a, str>> = args.iter().map(|a| (*a).into()).collect();
    let opens_channel = args.first().is_some_and(|cmd| CHANNELS.contains(cmd));
    let chosen = args.iter().any(|a| {
        a.starts_with("--tls-dir")
            || a.contains("tls_dir=")
            || a.contains("insecure_plaintext")
            || *a == "--insecure-plaintext"
    });
    let unix = args.iter().any(|a| a.contains("unix:"));
    if opens_channel && !chosen && !unix {
        out.push("--tls-dir".into());
        out.push(tls_dir().to_string_lossy().into_owned().into());
    }
    out
}

/// Runs `ch-remote --api-socket SOCKET ARGS...`, feeding `stdin` to it (see
/// [`with_channel_security`]).
pub fn ch_remote(socket: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let args = with_channel_security(args);
    let mut child = Command::new(ch_remote_binary())
        .arg("--api-socket")
        .arg(socket)
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ch-remote");
    if let Some(mut input) = child.stdin.take() {
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
    }
    child.wait_with_output().expect("wait for ch-remote")
}

/// One raw HTTP request on the API socket, answered within `limit` (connect, write and read
/// all count): the status code and the body. For tests that time the API itself, without a
/// `ch-remote` process start in the measurement.
pub fn api_request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    limit: Duration,
) -> Result<(u16, String)> {
    let started = Instant::now();
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .context(|| format!("connect {socket:?}"))?;
    stream
        .set_read_timeout(Some(limit))
        .context(|| "read timeout".into())?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .context(|| format!("send {method} {endpoint}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context(|| format!("{method} {endpoint}: no answer within {limit:?}"))?;
    if started.elapsed() > limit {
        return err(format!(
            "{method} {endpoint}: answered after {:?} (limit {limit:?})",
            started.elapsed()
        ));
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            Error(format!(
                "{method} {endpoint}: not an HTTP response: {text:?}"
            ))
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until the VMM's API socket accepts connections.
pub fn wait_for_api_socket(vmm: &mut Vmm, socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "{}",
            vmm.diagnose("the API socket never appeared")
        );
        if let Some(status) = vmm.poll_exit() {
            panic!(
                "{}",
                vmm.diagnose(&format!("the VMM exited ({status}) before serving the API"))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

/// A network namespace created for one test (`ip netns add`), deleted on drop with everything
/// in it (TAPs included). Only addresses inside it carry the test's traffic.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(label: &str) -> Result<NetNs> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("tnd-{label}-{}-{n}", std::process::id());
        let name: String = name.chars().take(40).collect();
        run_ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NS ARGS...` and fails with its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// A wrapper that runs a command inside the namespace (for [`VmmBuilder::wrapped_in`]).
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Runs `f` on a thread that has joined the namespace, so sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || -> Result<T> {
            let file = File::open(&path).context(|| format!("open {path}"))?;
            // SAFETY: setns on a namespace fd we opened; it only changes this thread's
            // network namespace, which is the point of this dedicated thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return err(format!("setns {path}: {}", io::Error::last_os_error()));
            }
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| Error("namespace thread panicked".to_string()))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        return err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Whether this process may create network namespaces and TAP devices; prints a loud SKIP
/// line for `test` when it may not.
/// Two "hosts" and a client, as network namespaces: the client namespace has a bridge
/// (192.168.249.1/24); each host has a bridge joining TAPs named `tapvm` and `tapvm2` (the same
/// names on both, as a VM configuration names them) to a veth into the client's bridge; the hosts reach each
/// other over their own link, `a` at 10.77.0.1 and `b` at 10.77.0.2 (migration and
/// replication traffic); the hosts also have addresses of their own on the client network
/// ([`CLIENT_NET_A`], [`CLIENT_NET_B`]). `tag` keeps the namespace names of concurrent tests apart.
pub struct TwoHosts {
    pub client: NetNs,
    pub a: NetNs,
    pub b: NetNs,
}

/// The client namespace's address (a witness for both hosts can listen there).
pub const CLIENT_NET: &str = "192.168.249.1";
/// Host `a`'s own address on the client network.
pub const CLIENT_NET_A: &str = "192.168.249.11";
/// Host `b`'s own address on the client network.
pub const CLIENT_NET_B: &str = "192.168.249.12";

/// Address of host `a` on the host-to-host link.
pub const HOST_A: &str = "10.77.0.1";
/// Address of host `b` on the host-to-host link.
pub const HOST_B: &str = "10.77.0.2";

pub fn two_hosts(tag: &str) -> TwoHosts {
    try_two_hosts(tag).expect("network setup")
}

/// [`two_hosts`] that returns an error instead of panicking (for the benchmarks).
pub fn try_two_hosts(tag: &str) -> Result<TwoHosts> {
    let client = NetNs::new(&format!("{tag}cli"))?;
    let a = NetNs::new(&format!("{tag}ha"))?;
    let b = NetNs::new(&format!("{tag}hb"))?;
    client.ip(&["link", "add", "br0", "type", "bridge"])?;
    client.ip(&["addr", "add", "192.168.249.1/24", "dev", "br0"])?;
    client.ip(&["link", "set", "br0", "up"])?;
    for (host, side) in [(&a, "a"), (&b, "b")] {
        let veth = format!("v{side}");
        let peer = format!("v{side}p");
        host.ip(&[
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            client.name(),
        ])?;
        client.ip(&["link", "set", &peer, "master", "br0", "up"])?;
        host.ip(&["link", "add", "brh", "type", "bridge"])?;
        host.ip(&["link", "set", "brh", "up"])?;
        host.ip(&["link", "set", &veth, "master", "brh", "up"])?;
        // A second TAP for tests that run two VMs on one host (FT groups).
        for tap in ["tapvm", "tapvm2"] {
            host.ip(&["tuntap", "add", tap, "mode", "tap", "vnet_hdr"])?;
            host.ip(&["link", "set", tap, "master", "brh", "up"])?;
        }
        // The host itself on the client network (to reach a witness there).
        let own = if side == "a" {
            CLIENT_NET_A
        } else {
            CLIENT_NET_B
        };
        host.ip(&["addr", "add", &format!("{own}/24"), "dev", "brh"])?;
    }
    // Link names must not be prefixes of `ip` keywords.
    a.ip(&[
        "link",
        "add",
        "hlinka",
        "type",
        "veth",
        "peer",
        "name",
        "hlinkb",
        "netns",
        b.name(),
    ])?;
    a.ip(&["addr", "add", &format!("{HOST_A}/24"), "dev", "hlinka"])?;
    a.ip(&["link", "set", "hlinka", "up"])?;
    b.ip(&["addr", "add", &format!("{HOST_B}/24"), "dev", "hlinkb"])?;
    b.ip(&["link", "set", "hlinkb", "up"])?;
    Ok(TwoHosts { client, a, b })
}

/// The flags that boot `kernel` (the test guest) with `cmdline` and `memory` (`size=...`), its
/// console on the VMM's stdout (where [`Vmm::wait_for`] reads it) and one NIC `net`
/// (`tap=...,mac=...`), followed by `extra` (e.g. `--disk`, `-v`).
pub fn guest_vm_args(
    kernel: &str,
    cmdline: &str,
    memory: &str,
    net: &str,
    extra: &[&str],
) -> Vec<String> {
    let base = [
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
        "--memory",
        memory,
        "--serial",
        "tty",
        "--console",
        "off",
        "--net",
        net,
    ];
    base.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// Starts a VMM with an API socket inside `host` and waits for the socket.
pub fn api_vmm(timeout: Duration, name: &str, host: &NetNs, socket: &Path, extra: &[&str]) -> Vmm {
    let mut vmm = Vmm::builder(name)
        .wrapped_in(host.exec_prefix())
        .args(["--api-socket", socket.to_str().expect("path")])
        .args(extra)
        .spawn()
        .expect("start a VMM");
    wait_for_api_socket(&mut vmm, socket, timeout);
    vmm
}

pub fn netns_or_skip(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    let iproute2 = Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !iproute2 {
        missing.push("iproute2 (`ip`)");
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun");
    }
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(
        test,
        &format!(
            "needs root, iproute2 and /dev/net/tun; missing: {}",
            missing.join(", ")
        ),
    );
    false
}

/// Like `require_kvm!`, for tests that need network namespaces and TAP devices.
#[macro_export]
macro_rules! require_netns {
    () => {
        if !$crate::netns_or_skip($crate::function_name!()) {
            return;
        }
    };
}

/// Each thread of process `pid`: its name and its `Seccomp:` mode (2: a filter is installed).
pub fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    thread_status(pid, "Seccomp:")
}

/// Each thread of `pid` with a field of its `/proc/<pid>/task/<tid>/status` (`key` with its
/// colon, e.g. `Cpus_allowed_list:`): (thread name, value).
pub fn thread_status(pid: u32, key: &str) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads = Vec::new();
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field(key)));
    }
    threads
}

/// Panics naming the threads of `pid` that run without a seccomp filter.
pub fn assert_every_thread_filtered(pid: u32, what: &str) {
    let threads = thread_seccomp(pid);
    assert!(
        !threads.is_empty(),
        "{what}: no threads found for pid {pid}"
    );
    let open: Vec<_> = threads.iter().filter(|(_, mode)| mode != "2").collect();
    assert!(
        open.is_empty(),
        "{what}: threads without a seccomp filter: {open:?} (all: {threads:?})"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_fields_parses_plain_and_quoted_values() {
        let f = marker_fields(
            r#"TANDEM-GUEST READY entry=pvh cpus=2 mem_mib=512 clock=tsc cmdline="workload=hello exit=shutdown""#,
        );
        assert_eq!(f["entry"], "pvh");
        assert_eq!(f["cpus"], "2");
        assert_eq!(f["mem_mib"], "512");
        assert_eq!(f["cmdline"], "workload=hello exit=shutdown");
    }

    #[test]
    fn line_with_returns_the_whole_line() {
        let text = "a\nfoo MARK bar\nb";
        assert_eq!(
            line_with(text, "MARK", false).as_deref(),
            Some("foo MARK bar")
        );
        assert_eq!(line_with(text, "nope", false), None);
        // A line still being written only counts once the writer is gone.
        assert_eq!(line_with("x\nMARK at e", "MARK", false), None);
        assert_eq!(
            line_with("x\nMARK at e", "MARK", true).as_deref(),
            Some("MARK at e")
        );
    }

    #[test]
    fn vmm_wrapper_collects_output_and_kills_on_drop() {
        let sh = Path::new("/bin/sh");
        let mut p = Vmm::builder("self-test")
            .program(sh)
            .args([
                "-c",
                "echo one; echo 'TANDEM-GUEST READY cpus=1'; echo err >&2; exec sleep 600",
            ])
            .spawn()
            .expect("spawn sh");
        let found = p
            .wait_for(GUEST_READY, Duration::from_secs(10))
            .expect("marker");
        assert_eq!(found.line, "TANDEM-GUEST READY cpus=1");
        let pid = p.pid() as libc::pid_t;
        drop(p);
        // SAFETY: signal 0 only checks whether the PID exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "process {pid} survived the drop of its Vmm");
    }

    #[test]
    fn wait_for_fails_fast_when_the_process_exits() {
        let mut p = Vmm::builder("self-test")
            .program(Path::new("/bin/sh"))
            .args(["-c", "echo bad input >&2; exit 3"])
            .spawn()
            .expect("spawn sh");
        let e = p
            .wait_for(GUEST_READY, Duration::from_secs(30))
            .expect_err("no marker");
        assert!(e.to_string().contains("exited"), "{e}");
        let status = p.wait_exit(Duration::from_secs(5)).expect("exit");
        assert_eq!(status.code(), Some(3));
        assert_eq!(p.stderr(), "bad input\n");
    }
}
