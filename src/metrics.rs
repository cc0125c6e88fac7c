//! Collects one heartbeat's data on Linux from /proc, /sys, statvfs(2) and the configured custom
//! files and commands. It runs on a worker thread and may block, but never longer than the
//! largest custom `timeout_s`. Nothing here panics on odd input: the parsers are small pure
//! functions over text, and every failure becomes a zero, an absent value or an error value.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::config::{CustomSpec, HeartbeatConfig, ProcessSpec};
use crate::fsutil::error_text;
use crate::protocol::{Disk, Heartbeat, Memory, NetIface, ProcessInfo, Temperature};
use crate::runner::{self, spawn_small, End, Output, Program};

/// Caps for small kernel files, so an odd file never costs much memory.
const SMALL_FILE: u64 = 4096;
const MEMINFO_MAX: u64 = 16 * 1024;

pub struct Collector {
    config: HeartbeatConfig,
    /// `uname -m`: fixed for the life of the process.
    machine: String,
    /// Clock ticks per second, the unit of CPU times in /proc.
    ticks_per_s: f64,
    /// The system CPU counters at the previous call; zero (boot) before the first.
    prev_cpu: CpuTimes,
    /// CPU ticks of each reported process at the previous call, by (pid, start time) so that a
    /// restarted process or a reused pid never counts against another process's ticks.
    prev_process_ticks: HashMap<(u32, u64), u64>,
    /// Uptime at the previous call. Process start times are on the same clock, which is why it
    /// is used rather than `Instant`.
    prev_uptime: Option<f64>,
    /// Custom file reads that overran their time limit and are still blocked in the kernel, by
    /// name: not started again until they return, so a hung file costs one thread, not one
    /// per heartbeat.
    blocked_reads: BlockedReads,
}

impl Collector {
    pub fn new(config: &crate::config::HeartbeatConfig) -> Collector {
        Collector {
            config: config.clone(),
            machine: machine_name(),
            ticks_per_s: ticks_per_second(),
            prev_cpu: CpuTimes::default(),
            prev_process_ticks: HashMap::new(),
            prev_uptime: None,
            blocked_reads: HashMap::new(),
        }
    }

    /// Collects everything; `seq` and `dropped` are copied into the result.
    pub fn collect(&mut self, seq: u64, dropped: u64) -> crate::protocol::Heartbeat {
        let ts = unix_millis();
        // Commands start first so that they run while /proc is read.
        let custom = self.start_custom();
        let uptime = read_small("/proc/uptime").ok().and_then(|text| parse_uptime(&text));
        let load = read_small("/proc/loadavg").ok().and_then(|text| parse_loadavg(&text));
        let cpu_pct = self.cpu_pct();
        let processes = self.processes(uptime);
        self.prev_uptime = uptime;
        Heartbeat {
            seq,
            ts,
            machine: self.machine.clone(),
            uptime_s: uptime.unwrap_or(0.0) as u64,
            load: load.unwrap_or_default(),
            cpu_pct,
            mem: read_memory(),
            disks: self.config.disks.iter().map(|mount| disk(mount)).collect(),
            net: read_net(),
            processes,
            temperatures: read_temperatures(),
            custom: self.finish_custom(custom),
            dropped,
        }
    }

    /// Busy % of all CPUs since the previous call.
    fn cpu_pct(&mut self) -> f64 {
        // The first line is the all-CPU total; the rest (per CPU, per interrupt) is not needed.
        let total = read_small("/proc/stat").ok().and_then(|text| parse_cpu_line(text.lines().next()?));
        let Some(now) = total else {
            return 0.0;
        };
        let pct = busy_pct(self.prev_cpu, now);
        self.prev_cpu = now;
        pct
    }

    fn processes(&mut self, uptime: Option<f64>) -> Vec<ProcessInfo> {
        let found = find_processes(&self.config.processes);
        let mut ticks = HashMap::new();
        let infos = self
            .config
            .processes
            .iter()
            .zip(found)
            .map(|(spec, found)| match found {
                Some((pid, stat)) => {
                    ticks.insert((pid, stat.start_ticks), stat.cpu_ticks);
                    ProcessInfo {
                        name: spec.name.clone(),
                        running: true,
                        pid: Some(pid),
                        rss_kb: read_rss_kb(pid),
                        cpu_pct: uptime.and_then(|uptime| self.process_cpu_pct(pid, &stat, uptime)),
                    }
                }
                None => ProcessInfo {
                    name: spec.name.clone(),
                    running: false,
                    pid: None,
                    rss_kb: None,
                    cpu_pct: None,
                },
            })
            .collect();
        self.prev_process_ticks = ticks;
        infos
    }

    /// % of one core (like `top`, so a busy multi-threaded process can exceed 100) since the
    /// previous call, or since the process started when it was not seen then.
    fn process_cpu_pct(&self, pid: u32, stat: &ProcStat, uptime: f64) -> Option<f64> {
        let previous = self.prev_process_ticks.get(&(pid, stat.start_ticks)).zip(self.prev_uptime);
        let (ticks, seconds) = match previous {
            Some((&prev_ticks, prev_uptime)) => {
                (stat.cpu_ticks.saturating_sub(prev_ticks), uptime - prev_uptime)
            }
            None => (stat.cpu_ticks, uptime - stat.start_ticks as f64 / self.ticks_per_s),
        };
        (seconds > 0.0).then(|| round1(ticks as f64 / self.ticks_per_s / seconds * 100.0))
    }
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn machine_name() -> String {
    // SAFETY: utsname is plain bytes, so all-zero is valid; uname only writes into it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates every utsname field, and the struct was zeroed anyway.
    unsafe { CStr::from_ptr(uts.machine.as_ptr()) }.to_string_lossy().into_owned()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Reads at most `max` bytes of a file as text; invalid UTF-8 is replaced, never an error.
fn read_capped(path: impl AsRef<Path>, max: u64) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)?.take(max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_small(path: impl AsRef<Path>) -> io::Result<String> {
    read_capped(path, SMALL_FILE)
}

fn error_value(message: impl Into<String>) -> Value {
    json!({ "error": message.into() })
}

// ---- Plain parsers: text in, value out, `None` or zero on anything odd. ----

/// A finite number; Rust also parses "NaN" and "inf", which JSON cannot carry.
fn parse_finite(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// `/proc/uptime`: "12345.67 54321.00", seconds since boot first.
fn parse_uptime(text: &str) -> Option<f64> {
    parse_finite(text.split_whitespace().next()?).filter(|s| *s >= 0.0)
}

/// `/proc/loadavg`: "0.52 0.58 0.59 1/467 12345".
fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(parse_finite);
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Cumulative CPU time of all CPUs, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuTimes {
    busy: u64,
    total: u64,
}

/// The aggregate "cpu  user nice system idle iowait irq softirq steal guest guest_nice" line of
/// /proc/stat. Old kernels give fewer fields; guest times are already inside user and nice.
fn parse_cpu_line(line: &str) -> Option<CpuTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let mut ticks = [0u64; 8];
    for (slot, field) in ticks.iter_mut().zip(fields) {
        *slot = field.parse().ok()?;
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks;
    let total = [user, nice, system, idle, iowait, irq, softirq, steal]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b));
    Some(CpuTimes { busy: total.saturating_sub(idle).saturating_sub(iowait), total })
}

/// Busy % between two samples. Some kernels let iowait go backwards, hence saturating and clamping.
fn busy_pct(prev: CpuTimes, now: CpuTimes) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy);
    round1((busy as f64 / total as f64 * 100.0).min(100.0))
}

/// The number in a "Key:   1234 kB" line of /proc/meminfo or /proc/PID/status; `key` includes
/// the colon, so "Cached:" does not match "SwapCached:".
fn kb_field(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?.split_whitespace().next()?.parse().ok()
}

fn parse_meminfo(text: &str) -> Memory {
    let field = |key: &str| text.lines().find_map(|line| kb_field(line, key));
    // MemAvailable appeared in Linux 3.14; before that, free + buffers + page cache is the
    // usual approximation.
    let available = field("MemAvailable:")
        .unwrap_or_else(|| ["MemFree:", "Buffers:", "Cached:"].iter().filter_map(|key| field(key)).sum());
    Memory { total_kb: field("MemTotal:").unwrap_or(0), available_kb: available }
}

/// One interface line of /proc/net/dev: "  eth0: RX bytes packets errs drop fifo frame
/// compressed multicast TX bytes ...". Old kernels put no space after the colon.
fn parse_net_dev_line(line: &str) -> Option<NetIface> {
    let (iface, counters) = line.split_once(':')?;
    let iface = iface.trim();
    let mut fields = counters.split_whitespace();
    let rx_bytes = fields.next()?.parse().ok()?;
    let tx_bytes = fields.nth(7)?.parse().ok()?;
    (!iface.is_empty()).then(|| NetIface { iface: iface.to_string(), rx_bytes, tx_bytes })
}

/// What /proc/PID/stat says that matters here.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcStat {
    zombie: bool,
    /// utime + stime.
    cpu_ticks: u64,
    /// Ticks after boot when the process started.
    start_ticks: u64,
}

/// "PID (COMM) STATE PPID ..." where COMM may hold spaces and parentheses, so the fields
/// start after the last ')'.
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().take(20).collect();
    let number = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // Field numbers in proc(5) minus 3: state is field 3, utime 14, stime 15, starttime 22.
    Some(ProcStat {
        zombie: *fields.first()? == "Z",
        cpu_ticks: number(11)?.saturating_add(number(12)?),
        start_ticks: number(19)?,
    })
}

/// A pid file holds a decimal pid and perhaps a newline.
fn parse_pid(text: &str) -> Option<u32> {
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

/// The program name in /proc/PID/cmdline (NUL-separated argv): argv[0]'s file name.
fn argv0_name(cmdline: &str) -> Option<&str> {
    let argv0 = cmdline.split('\0').next()?;
    Some(file_name(argv0)).filter(|name| !name.is_empty())
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The file name of the /proc/PID/exe link; an upgraded binary shows as "NAME (deleted)".
fn exe_name(target: &str) -> &str {
    let name = file_name(target);
    name.strip_suffix(" (deleted)").unwrap_or(name)
}

/// A custom value from command output or file content, trimmed: an object, an array, `true`,
/// `false` or `null` as JSON; a number only when JSON gives back the same text (a version
/// "2.10" would turn into 2.1, a serial number's digits into a float); otherwise a string.
fn output_value(bytes: &[u8]) -> Value {
    let text = utf8_prefix(bytes);
    let text = text.trim();
    match serde_json::from_str(text) {
        Ok(value @ (Value::Object(_) | Value::Array(_) | Value::Bool(_) | Value::Null)) => value,
        Ok(Value::Number(n)) if n.to_string() == text => Value::Number(n),
        _ => Value::String(text.to_string()),
    }
}

/// Text of possibly-capped output: a character cut in half by the cap is dropped rather than
/// shown as U+FFFD; other invalid bytes are replaced.
fn utf8_prefix(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Err(e) if e.error_len().is_none() => String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
        _ => String::from_utf8_lossy(bytes),
    }
}

// ---- System-wide readings. ----

fn read_memory() -> Memory {
    read_capped("/proc/meminfo", MEMINFO_MAX).map(|text| parse_meminfo(&text)).unwrap_or_default()
}

fn disk(mount: &str) -> Disk {
    match statvfs_kb(mount) {
        Ok((total_kb, free_kb)) => Disk { mount: mount.to_string(), total_kb, free_kb, error: None },
        Err(e) => Disk { mount: mount.to_string(), total_kb: 0, free_kb: 0, error: Some(error_text(&e)) },
    }
}

/// (total, available to unprivileged users), in KiB.
fn statvfs_kb(mount: &str) -> io::Result<(u64, u64)> {
    let path = CString::new(mount).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: statvfs is plain numbers, so all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is writable.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field types differ between libcs and word sizes, hence the casts.
    let (blocks, available, fragment, block) =
        (st.f_blocks as u64, st.f_bavail as u64, st.f_frsize as u64, st.f_bsize as u64);
    // Very old kernels leave f_frsize zero; f_bsize is the unit then.
    let unit = if fragment > 0 { fragment } else { block };
    let kb = |count: u64| count.saturating_mul(unit) / 1024;
    Ok((kb(blocks), kb(available)))
}

/// Every interface in /proc/net/dev except loopback, read a line at a time.
fn read_net() -> Vec<NetIface> {
    let Ok(file) = File::open("/proc/net/dev") else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| parse_net_dev_line(&line))
        .filter(|iface| iface.iface != "lo")
        .collect()
}

/// Thermal zones that give a reading, in zone order; a sensor that is off fails its read and is
/// left out.
fn read_temperatures() -> Vec<Temperature> {
    let Ok(entries) = fs::read_dir("/sys/class/thermal") else {
        return Vec::new();
    };
    let mut zones: Vec<(u32, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let index = entry.file_name().to_str()?.strip_prefix("thermal_zone")?.parse().ok()?;
            Some((index, entry.path()))
        })
        .collect();
    zones.sort();
    zones
        .iter()
        .filter_map(|(index, dir)| {
            let millidegrees: i64 = read_small(dir.join("temp")).ok()?.trim().parse().ok()?;
            let zone = read_small(dir.join("type")).map(|t| t.trim().to_string()).unwrap_or_default();
            let zone = if zone.is_empty() { format!("thermal_zone{index}") } else { zone };
            Some(Temperature { zone, celsius: millidegrees as f64 / 1000.0 })
        })
        .collect()
}

// ---- Processes. ----

fn proc_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}"))
}

fn read_proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&read_small(proc_dir(pid).join("stat")).ok()?)
}

/// VmRSS from /proc/PID/status, read a line at a time up to it. Kernel threads have none.
fn read_rss_kb(pid: u32) -> Option<u64> {
    let file = File::open(proc_dir(pid).join("status")).ok()?;
    BufReader::new(file).lines().map_while(Result::ok).find_map(|line| kb_field(&line, "VmRSS:"))
}

/// The live (non-zombie) process for each spec, in spec order.
fn find_processes(specs: &[ProcessSpec]) -> Vec<Option<(u32, ProcStat)>> {
    let names: Vec<&str> =
        specs.iter().filter(|spec| spec.pidfile.is_none()).map(|spec| spec.name.as_str()).collect();
    let mut by_name = find_by_names(&names).into_iter();
    specs
        .iter()
        .map(|spec| match &spec.pidfile {
            Some(pidfile) => find_by_pidfile(pidfile),
            None => by_name.next().flatten(),
        })
        .collect()
}

fn find_by_pidfile(pidfile: &Path) -> Option<(u32, ProcStat)> {
    let pid = parse_pid(&read_small(pidfile).ok()?)?;
    let stat = read_proc_stat(pid).filter(|stat| !stat.zombie)?;
    Some((pid, stat))
}

/// One pass over /proc for all names at once; when several processes have a name, the oldest
/// wins (a daemon's master rather than its workers), then the lowest pid.
fn find_by_names(names: &[&str]) -> Vec<Option<(u32, ProcStat)>> {
    let mut found: Vec<Option<(u32, ProcStat)>> = vec![None; names.len()];
    if names.is_empty() {
        return found;
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for pid in entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let known_as = process_names(pid);
        let mut stat = None;
        for (slot, name) in found.iter_mut().zip(names) {
            if !known_as.iter().any(|known| known == name) {
                continue;
            }
            // Read lazily: most processes match nothing. A vanished process reads as None.
            let Some(this) = *stat.get_or_insert_with(|| read_proc_stat(pid)) else { break };
            let older =
                slot.is_none_or(|(best_pid, best)| (this.start_ticks, pid) < (best.start_ticks, best_pid));
            if !this.zombie && older {
                *slot = Some((pid, this));
            }
        }
    }
    found
}

/// The names a process goes by: its comm (truncated by the kernel to 15 bytes), and the file
/// names of its executable and of argv[0], which are not truncated.
fn process_names(pid: u32) -> Vec<String> {
    let dir = proc_dir(pid);
    let mut names = Vec::with_capacity(3);
    if let Ok(comm) = read_small(dir.join("comm")) {
        names.push(comm.strip_suffix('\n').unwrap_or(&comm).to_string());
    }
    if let Ok(exe) = fs::read_link(dir.join("exe")) {
        names.push(exe_name(&exe.to_string_lossy()).to_string());
    }
    if let Ok(cmdline) = read_small(dir.join("cmdline")) {
        names.extend(argv0_name(&cmdline).map(str::to_string));
    }
    names
}

// ---- Custom values. ----

/// A custom value being produced: files are read and commands run on threads of their own,
/// each within its `timeout_s`.
enum Pending {
    Ready(Value),
    Running(JoinHandle<CommandResult>),
    Reading { rx: FileRead, deadline: Instant, timeout_s: u64 },
}

/// A file read's outcome, sent by its thread.
type FileRead = Receiver<io::Result<Vec<u8>>>;
type BlockedReads = HashMap<String, FileRead>;

impl Collector {
    fn start_custom(&mut self) -> Vec<(String, Pending)> {
        let blocked = &mut self.blocked_reads;
        self.config.custom.iter().map(|(name, spec)| (name.clone(), start_one(name, spec, blocked))).collect()
    }

    fn finish_custom(&mut self, pending: Vec<(String, Pending)>) -> BTreeMap<String, Value> {
        pending
            .into_iter()
            .map(|(name, pending)| {
                let value = self.finish_one(&name, pending);
                (name, value)
            })
            .collect()
    }

    fn finish_one(&mut self, name: &str, pending: Pending) -> Value {
        match pending {
            Pending::Ready(value) => value,
            Pending::Running(handle) => match handle.join() {
                Ok(result) => result.into_value(),
                Err(_) => error_value("the command's thread panicked"),
            },
            Pending::Reading { rx, deadline, timeout_s } => {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(Ok(bytes)) => output_value(&bytes),
                    Ok(Err(e)) => error_value(error_text(&e)),
                    Err(RecvTimeoutError::Timeout) => {
                        log::warn!("custom value {name}: reading its file timed out after {timeout_s} s");
                        self.blocked_reads.insert(name.to_string(), rx);
                        error_value(format!("timed out after {timeout_s} s"))
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        error_value("the reading thread ended without a result")
                    }
                }
            }
        }
    }
}

fn start_one(name: &str, spec: &CustomSpec, blocked: &mut BlockedReads) -> Pending {
    match (&spec.file, &spec.command) {
        (Some(path), _) => start_read(name, path, spec, blocked),
        (None, Some(argv)) => {
            // Its output is parsed as JSON here, on the caller's thread, not on the small one.
            let (argv, timeout_s, max_bytes) = (argv.clone(), spec.timeout_s, spec.max_bytes);
            match spawn_small("custom-command", move || run_command(&argv, timeout_s, max_bytes)) {
                Ok(handle) => Pending::Running(handle),
                Err(e) => Pending::Ready(error_value(format!("cannot start a thread: {}", error_text(&e)))),
            }
        }
        (None, None) => Pending::Ready(error_value("neither file nor command is configured")),
    }
}

/// Reads a custom file on a thread: a file on a hung NFS mount, a sensor driver stuck on
/// its bus or a FIFO nobody writes to would otherwise block the heartbeat for good.
fn start_read(name: &str, path: &Path, spec: &CustomSpec, blocked: &mut BlockedReads) -> Pending {
    if let Some(rx) = blocked.remove(name) {
        if let Err(TryRecvError::Empty) = rx.try_recv() {
            blocked.insert(name.to_string(), rx);
            return Pending::Ready(error_value("still blocked reading it since an earlier heartbeat"));
        }
    }
    let (tx, rx) = mpsc::channel();
    let (path, max_bytes) = (path.to_path_buf(), spec.max_bytes as u64);
    let spawned = spawn_small("custom-file", move || {
        let mut bytes = Vec::new();
        let read = File::open(&path).and_then(|file| file.take(max_bytes).read_to_end(&mut bytes));
        let _ = tx.send(read.map(|_| bytes));
    });
    match spawned {
        Ok(_) => Pending::Reading {
            rx,
            deadline: Instant::now() + Duration::from_secs(spec.timeout_s),
            timeout_s: spec.timeout_s,
        },
        Err(e) => Pending::Ready(error_value(format!("cannot start a thread: {}", error_text(&e)))),
    }
}

/// What running a custom command gave: its stdout (capped) and why it failed, if it did.
#[derive(Debug)]
struct CommandResult {
    output: Vec<u8>,
    failure: Option<String>,
}

impl CommandResult {
    /// A failed command gives `{"error": ...}`. If it printed something (a check script that
    /// says why it exits 1, or progress before a timeout), that is kept under "output": the
    /// error is what a dashboard alerts on, the output is what a person reads next.
    fn into_value(self) -> Value {
        match self.failure {
            None => output_value(&self.output),
            Some(failure) if self.output.is_empty() => error_value(failure),
            Some(failure) => json!({ "error": failure, "output": output_value(&self.output) }),
        }
    }
}

/// Runs argv without a shell, in its own process group, and kills that whole group at the
/// timeout or as soon as the command itself exits (so a background child that still holds
/// stdout open can neither delay the result nor outlive the heartbeat).
fn run_command(argv: &[String], timeout_s: u64, max_bytes: usize) -> CommandResult {
    let program = Program {
        timeout: Some(Duration::from_secs(timeout_s)),
        ..Program::new(argv, Output::Stdout { max_bytes })
    };
    let finished = match runner::run(&program) {
        Ok(finished) => finished,
        Err(e) => return CommandResult { output: Vec::new(), failure: Some(error_text(&e)) },
    };
    let failure = match finished.end {
        End::Exited(status) if status.success() => None,
        End::Exited(status) => Some(runner::describe(status)),
        End::TimedOut => Some(format!("timed out after {timeout_s} s")),
        End::Stopped => Some("stopped".into()),
    };
    CommandResult { output: finished.stdout, failure }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- Parsers over sample text. ----

    #[test]
    fn uptime_and_loadavg() {
        assert_eq!(parse_uptime("12345.67 54321.00\n"), Some(12345.67));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("nan 1"), None);
        assert_eq!(parse_uptime("garbage"), None);
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 12345\n"), Some([0.52, 0.58, 0.59]));
        assert_eq!(parse_loadavg("0.52 0.58"), None);
        assert_eq!(parse_loadavg("0.52 x 0.59"), None);
        assert_eq!(parse_loadavg("inf 1 1"), None);
    }

    #[test]
    fn cpu_line() {
        let line = "cpu  4705 356 584 3699 23 23 0 0 10 0\n";
        let times = parse_cpu_line(line).unwrap();
        assert_eq!(times, CpuTimes { total: 4705 + 356 + 584 + 3699 + 23 + 23, busy: 4705 + 356 + 584 + 23 });
        // Linux 2.4: four fields.
        assert_eq!(parse_cpu_line("cpu 10 0 10 80"), Some(CpuTimes { busy: 20, total: 100 }));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4"), None);
        assert_eq!(parse_cpu_line("cpu 1 x 3 4"), None);
        assert_eq!(parse_cpu_line(""), None);
        assert_eq!(parse_cpu_line("cpu"), Some(CpuTimes::default()));
    }

    #[test]
    fn busy_percent() {
        let prev = CpuTimes { busy: 100, total: 1000 };
        assert_eq!(busy_pct(prev, CpuTimes { busy: 125, total: 1100 }), 25.0);
        assert_eq!(busy_pct(prev, prev), 0.0);
        // Counters going backwards (iowait on some kernels) never give a negative or >100 %.
        assert_eq!(busy_pct(prev, CpuTimes { busy: 90, total: 1100 }), 0.0);
        assert_eq!(busy_pct(prev, CpuTimes { busy: 300, total: 1100 }), 100.0);
        assert_eq!(busy_pct(CpuTimes::default(), CpuTimes { busy: 1, total: 3 }), 33.3);
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        2048000 kB\nMemFree:          100000 kB\n\
                    MemAvailable:    1500000 kB\nBuffers:           20000 kB\nCached:           300000 kB\n\
                    SwapCached:            5 kB\n";
        assert_eq!(parse_meminfo(text), Memory { total_kb: 2048000, available_kb: 1500000 });
        // Before Linux 3.14 there is no MemAvailable.
        let old =
            "MemTotal:  65536 kB\nMemFree:  1000 kB\nBuffers:  200 kB\nCached:  3000 kB\nSwapCached: 7 kB\n";
        assert_eq!(parse_meminfo(old), Memory { total_kb: 65536, available_kb: 4200 });
        assert_eq!(parse_meminfo(""), Memory::default());
        assert_eq!(parse_meminfo("MemTotal: lots kB\nMemAvailable:\n"), Memory::default());
        assert_eq!(kb_field("VmRSS:\t   1234 kB", "VmRSS:"), Some(1234));
        assert_eq!(kb_field("VmRSSx: 1 kB", "VmRSS:"), None);
    }

    #[test]
    fn net_dev_lines() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
            eth0: 123456 100 0 0 0 0 0 0 654321 90 0 0 0 0 0 0\n\
            wlan0:5 1 0 0 0 0 0 0 6 1 0 0 0 0 0 0\n";
        let ifaces: Vec<NetIface> = text.lines().filter_map(parse_net_dev_line).collect();
        let names: Vec<&str> = ifaces.iter().map(|i| i.iface.as_str()).collect();
        assert_eq!(names, ["lo", "eth0", "wlan0"]);
        assert_eq!(ifaces[1], NetIface { iface: "eth0".into(), rx_bytes: 123456, tx_bytes: 654321 });
        assert_eq!(ifaces[2].tx_bytes, 6);
        assert_eq!(parse_net_dev_line("eth0: 1 2 3"), None);
        assert_eq!(parse_net_dev_line("eth0: x 0 0 0 0 0 0 0 1"), None);
        assert_eq!(parse_net_dev_line(": 1 0 0 0 0 0 0 0 1"), None);
    }

    #[test]
    fn proc_stat() {
        let text = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 500 0 0 0 70 30 0 0 20 0 1 0 5000 \
                    10000000 300 18446744073709551615\n";
        let stat = parse_proc_stat(text).unwrap();
        assert_eq!(stat, ProcStat { zombie: false, cpu_ticks: 100, start_ticks: 5000 });
        let zombie = "77 (defunct) Z 1 77 77 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 42 0 0";
        assert!(parse_proc_stat(zombie).unwrap().zombie);
        assert_eq!(parse_proc_stat("1234 (short) S 1 2 3"), None);
        assert_eq!(parse_proc_stat("no parenthesis at all"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn pids_and_names() {
        assert_eq!(parse_pid("1234\n"), Some(1234));
        assert_eq!(parse_pid(" 42 "), Some(42));
        assert_eq!(parse_pid("0"), None);
        assert_eq!(parse_pid("-5"), None);
        assert_eq!(parse_pid("12ab"), None);
        assert_eq!(parse_pid(""), None);
        assert_eq!(argv0_name("/usr/sbin/my-long-daemon-name\0--flag\0"), Some("my-long-daemon-name"));
        assert_eq!(argv0_name("plain\0"), Some("plain"));
        assert_eq!(argv0_name(""), None);
        assert_eq!(argv0_name("/usr/bin/\0"), None);
        assert_eq!(exe_name("/usr/bin/agent (deleted)"), "agent");
        assert_eq!(exe_name("/usr/bin/agent"), "agent");
    }

    #[test]
    fn output_values() {
        assert_eq!(output_value(b"  hello world\n"), json!("hello world"));
        assert_eq!(output_value(b"{\"a\": [1, true]}\n"), json!({"a": [1, true]}));
        assert_eq!(output_value(b"42\n"), json!(42));
        assert_eq!(output_value(b"-3.5"), json!(-3.5));
        assert_eq!(output_value(b"true"), json!(true));
        assert_eq!(output_value(b"null"), json!(null));
        assert_eq!(output_value(b"007"), json!("007"));
        // Numbers JSON would change stay as written.
        assert_eq!(output_value(b"2.10\n"), json!("2.10"));
        assert_eq!(output_value(b"1e3"), json!("1e3"));
        assert_eq!(output_value(b"-0"), json!("-0"));
        assert_eq!(output_value(b"123456789012345678901234567890"), json!("123456789012345678901234567890"));
        // A JSON string keeps its quotes: it is text, not a value to unwrap.
        assert_eq!(output_value(b"\"up\""), json!("\"up\""));
        assert_eq!(output_value(b""), json!(""));
        assert_eq!(output_value(b"{\"a\": 1"), json!("{\"a\": 1"));
        // "é" cut in half by max_bytes is dropped; other bad bytes are replaced.
        assert_eq!(output_value(b"caf\xc3"), json!("caf"));
        assert_eq!(output_value(b"a\xffb"), json!("a\u{fffd}b"));
    }

    #[test]
    fn failures_as_values() {
        let result =
            CommandResult { output: b"disk missing\n".to_vec(), failure: Some("exited with 2".into()) };
        assert_eq!(result.into_value(), json!({"error": "exited with 2", "output": "disk missing"}));
        let result = CommandResult { output: Vec::new(), failure: Some("exited with 2".into()) };
        assert_eq!(result.into_value(), json!({"error": "exited with 2"}));
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(error_text(&e), "No such file or directory");
    }

    // ---- Against the live system. ----

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tether-metrics-{}-{name}", std::process::id()))
    }

    fn config_with(
        processes: Vec<ProcessSpec>,
        custom: Vec<(&str, CustomSpec)>,
        disks: Vec<&str>,
    ) -> HeartbeatConfig {
        HeartbeatConfig {
            processes,
            custom: custom.into_iter().map(|(name, spec)| (name.to_string(), spec)).collect(),
            disks: disks.into_iter().map(str::to_string).collect(),
            ..HeartbeatConfig::default()
        }
    }

    fn command(argv: &[&str], timeout_s: u64) -> CustomSpec {
        CustomSpec {
            file: None,
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            timeout_s,
            max_bytes: 4096,
            public: false,
        }
    }

    fn file(path: &Path, max_bytes: usize) -> CustomSpec {
        CustomSpec { file: Some(path.to_path_buf()), command: None, timeout_s: 5, max_bytes, public: false }
    }

    fn by_name(name: &str) -> ProcessSpec {
        ProcessSpec { name: name.to_string(), pidfile: None }
    }

    #[test]
    fn system_readings() {
        let mut collector = Collector::new(&config_with(Vec::new(), Vec::new(), vec!["/", "/no/such/mount"]));
        let beat = collector.collect(7, 3);
        assert_eq!((beat.seq, beat.dropped), (7, 3));
        assert!(!beat.machine.is_empty());
        assert!(beat.ts > 1_600_000_000_000);
        assert!(beat.uptime_s > 0);
        assert!((0.0..=100.0).contains(&beat.cpu_pct));
        assert!(beat.net.iter().all(|iface| iface.iface != "lo"));
        assert!(beat.temperatures.iter().all(|t| t.celsius.is_finite() && !t.zone.is_empty()));

        let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
        let total: u64 = meminfo.lines().find_map(|line| kb_field(line, "MemTotal:")).unwrap();
        assert_eq!(beat.mem.total_kb, total);
        assert!(beat.mem.available_kb > 0 && beat.mem.available_kb <= total);

        assert_eq!(beat.disks[0].mount, "/");
        assert!(beat.disks[0].error.is_none() && beat.disks[0].total_kb > 0);
        assert!(beat.disks[0].free_kb <= beat.disks[0].total_kb);
        assert_eq!(beat.disks[1].error.as_deref(), Some("No such file or directory"));
        assert_eq!((beat.disks[1].total_kb, beat.disks[1].free_kb), (0, 0));

        let again = collector.collect(8, 3);
        assert!((0.0..=100.0).contains(&again.cpu_pct));
    }

    #[test]
    fn own_process_by_name_and_pidfile() {
        let own_pid = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let exe_name = exe.file_name().unwrap().to_str().unwrap().to_string();
        let comm = fs::read_to_string("/proc/self/comm").unwrap().trim_end_matches('\n').to_string();
        let pidfile = temp_path("pidfile");
        fs::write(&pidfile, format!("{own_pid}\n")).unwrap();
        let specs = vec![
            by_name(&exe_name),
            by_name(&comm),
            ProcessSpec { name: "me".into(), pidfile: Some(pidfile.clone()) },
            ProcessSpec { name: "gone".into(), pidfile: Some(temp_path("missing-pidfile")) },
            by_name("no-such-process-name-here"),
        ];
        let mut collector = Collector::new(&config_with(specs, Vec::new(), Vec::new()));
        let first = collector.collect(1, 0);
        // Burn some CPU so the second sample has a delta to measure.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(0u64);
        }
        let second = collector.collect(2, 0);
        fs::remove_file(&pidfile).unwrap();

        for beat in [&first, &second] {
            for info in &beat.processes[..3] {
                assert!(info.running, "{info:?}");
                assert_eq!(info.pid, Some(own_pid), "{info:?}");
                assert!(info.rss_kb.unwrap() > 0);
                assert!(info.cpu_pct.unwrap() >= 0.0);
            }
            assert_eq!(beat.processes[2].name, "me");
            for info in &beat.processes[3..] {
                assert_eq!((info.running, info.pid, info.rss_kb, info.cpu_pct), (false, None, None, None));
            }
        }
        assert!(second.processes[0].cpu_pct.unwrap() > 10.0, "{:?}", second.processes[0]);
    }

    #[test]
    fn custom_values() {
        let json_file = temp_path("custom.json");
        fs::write(&json_file, "  {\"x\": 2}\n").unwrap();
        let custom = vec![
            ("script", command(&["sh", "-c", "echo hello from sh"], 5)),
            ("json", command(&["printf", "{\"a\":1,\"b\":[true]}"], 5)),
            ("status", command(&["sh", "-c", "echo oops; exit 3"], 5)),
            ("silent_status", command(&["false"], 5)),
            ("missing", command(&["/no/such/program"], 5)),
            ("file", file(&json_file, 4096)),
            ("file_capped", file(&json_file, 5)),
            ("file_missing", file(&temp_path("missing"), 4096)),
            ("neither", CustomSpec { file: None, command: None, timeout_s: 5, max_bytes: 10, public: false }),
        ];
        let mut collector = Collector::new(&config_with(Vec::new(), custom, Vec::new()));
        let values = collector.collect(1, 0).custom;
        fs::remove_file(&json_file).unwrap();
        assert_eq!(values["script"], json!("hello from sh"));
        assert_eq!(values["json"], json!({"a": 1, "b": [true]}));
        assert_eq!(values["status"], json!({"error": "exited with 3", "output": "oops"}));
        assert_eq!(values["silent_status"], json!({"error": "exited with 1"}));
        assert_eq!(values["missing"], json!({"error": "No such file or directory"}));
        assert_eq!(values["file"], json!({"x": 2}));
        assert_eq!(values["file_capped"], json!("{\"x"));
        assert_eq!(values["file_missing"], json!({"error": "No such file or directory"}));
        assert!(values["neither"]["error"].is_string());
        assert_eq!(values.len(), 9);
    }

    #[test]
    fn collect_fits_on_a_worker_sized_stack() {
        // The agent collects on a 256 KiB worker thread; serde_json recurses once per nesting
        // level (at most 128), so check the deepest JSON a command can print.
        let nested = format!("{}{}", "[".repeat(127), "]".repeat(127));
        let custom = vec![("nested", command(&["printf", nested.as_str()], 5))];
        let config = config_with(vec![by_name("init")], custom, vec!["/"]);
        let worker = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || {
            let mut collector = Collector::new(&config);
            collector.collect(1, 0).custom["nested"].is_array()
        });
        assert!(worker.unwrap().join().unwrap());
    }

    #[test]
    fn hanging_commands_are_killed_at_their_timeout_concurrently() {
        let custom = vec![("a", command(&["sleep", "30"], 1)), ("b", command(&["sleep", "30"], 1))];
        let mut collector = Collector::new(&config_with(Vec::new(), custom, Vec::new()));
        let started = Instant::now();
        let values = collector.collect(1, 0).custom;
        let elapsed = started.elapsed();
        assert_eq!(values["a"], json!({"error": "timed out after 1 s"}));
        assert_eq!(values["b"], json!({"error": "timed out after 1 s"}));
        assert!(elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1900), "{elapsed:?}");
    }
}
