//! Turning heartbeats and statuses into short human-readable text.

use std::fmt::Write;

use tether::logging::utc_time;
use tether::protocol::{Heartbeat, Memory, Status};

/// `12s`, `3m`, `2h`, `4d`: the largest whole unit, as in a table column.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `3d4h`, `5h12m`, `7m30s`, `42s`: the two largest units.
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

pub fn percent_used(total: u64, free: u64) -> Option<f64> {
    (total > 0).then(|| total.saturating_sub(free) as f64 * 100.0 / total as f64)
}

pub fn mem_used_pct(mem: &Memory) -> Option<f64> {
    percent_used(mem.total_kb, mem.available_kb)
}

/// The first disk's used share, unless the agent could not read it.
pub fn disk_used_pct(hb: &Heartbeat) -> Option<f64> {
    let disk = hb.disks.first().filter(|d| d.error.is_none())?;
    percent_used(disk.total_kb, disk.free_kb)
}

/// `1.2/3.9 GiB`, or in MiB for the small memories of small devices.
fn used_of_total(used_kb: u64, total_kb: u64) -> String {
    const MIB: f64 = 1024.0;
    const GIB: f64 = 1024.0 * 1024.0;
    if total_kb as f64 >= GIB {
        format!("{:.1}/{:.1} GiB", used_kb as f64 / GIB, total_kb as f64 / GIB)
    } else {
        format!("{:.0}/{:.0} MiB", used_kb as f64 / MIB, total_kb as f64 / MIB)
    }
}

/// `2026-11-23T18:40:36Z dev1 #42 cpu 5.0% mem 31% (1.2/3.9 GiB) load 0.10 0.20 0.15 disk / 45%
/// up 3d4h procs sshd:up`
pub fn heartbeat_line(device: &str, hb: &Heartbeat) -> String {
    let mut line = format!("{} {device} #{} cpu {:.1}%", utc_time(hb.ts / 1000), hb.seq, hb.cpu_pct);
    if let Some(pct) = mem_used_pct(&hb.mem) {
        let used = hb.mem.total_kb.saturating_sub(hb.mem.available_kb);
        let _ = write!(line, " mem {pct:.0}% ({})", used_of_total(used, hb.mem.total_kb));
    }
    let [l1, l5, l15] = hb.load;
    let _ = write!(line, " load {l1:.2} {l5:.2} {l15:.2}");
    if !hb.disks.is_empty() {
        line.push_str(" disk");
        for disk in &hb.disks {
            match percent_used(disk.total_kb, disk.free_kb).filter(|_| disk.error.is_none()) {
                Some(pct) => write!(line, " {} {pct:.0}%", disk.mount),
                None => write!(line, " {} ?", disk.mount),
            }
            .unwrap_or_default();
        }
    }
    let _ = write!(line, " up {}", uptime(hb.uptime_s));
    if !hb.processes.is_empty() {
        line.push_str(" procs");
        for p in &hb.processes {
            let _ = write!(line, " {}:{}", p.name, if p.running { "up" } else { "DOWN" });
        }
    }
    for t in &hb.temperatures {
        let _ = write!(line, " temp {} {:.0}C", t.zone, t.celsius);
    }
    for (name, value) in &hb.custom {
        let _ = write!(line, " {name}={value}");
    }
    if hb.dropped > 0 {
        let _ = write!(line, " dropped {}", hb.dropped);
    }
    line
}

/// `dev1 online v0.1.0 armv7-unknown-linux-musleabihf` or `dev1 OFFLINE`, after a time stamp:
/// when the connection came up if the status says, else `now`.
pub fn status_line(device: &str, status: &Status, now: u64) -> String {
    if !status.online {
        return format!("{} {device} OFFLINE", utc_time(now));
    }
    let mut line = format!("{} {device} online", utc_time(status.since.unwrap_or(now)));
    if let Some(v) = &status.version {
        let _ = write!(line, " v{v}");
    }
    if let Some(arch) = &status.arch {
        let _ = write!(line, " {arch}");
    }
    line
}

/// A payload that is not what it should be, shown as text: escaped, and cut when long.
pub fn raw(payload: &[u8]) -> String {
    const SHOWN: usize = 300;
    let text = String::from_utf8_lossy(&payload[..payload.len().min(SHOWN)]);
    let more = if payload.len() > SHOWN { format!("… ({} bytes)", payload.len()) } else { String::new() };
    format!("{:?}{more}", text)
}

/// Left-aligned columns separated by two spaces; the first row is the header.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::protocol::{Disk, ProcessInfo};

    #[test]
    fn ages_and_uptimes() {
        assert_eq!([age(0), age(59), age(61), age(7200), age(200_000)], ["0s", "59s", "1m", "2h", "2d"]);
        assert_eq!(uptime(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        assert_eq!(uptime(3600 + 120), "1h2m");
        assert_eq!(uptime(450), "7m30s");
        assert_eq!(uptime(9), "9s");
    }

    #[test]
    fn heartbeat_reads_like_the_example() {
        let hb = Heartbeat {
            seq: 42,
            ts: 1_795_459_236_000,
            uptime_s: 3 * 86_400 + 4 * 3600,
            load: [0.1, 0.2, 0.15],
            cpu_pct: 5.0,
            mem: Memory { total_kb: 4_089_446, available_kb: 2_822_000 },
            disks: vec![Disk { mount: "/".into(), total_kb: 100, free_kb: 55, error: None }],
            processes: vec![ProcessInfo {
                name: "sshd".into(),
                running: true,
                pid: None,
                rss_kb: None,
                cpu_pct: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            heartbeat_line("dev1", &hb),
            "2026-11-23T18:40:36Z dev1 #42 cpu 5.0% mem 31% (1.2/3.9 GiB) load 0.10 0.20 0.15 \
             disk / 45% up 3d4h procs sshd:up"
        );
    }

    #[test]
    fn small_memory_in_mib_and_unreadable_disk() {
        let hb = Heartbeat {
            mem: Memory { total_kb: 131_072, available_kb: 65_536 },
            disks: vec![Disk { mount: "/data".into(), total_kb: 0, free_kb: 0, error: Some("x".into()) }],
            ..Default::default()
        };
        let line = heartbeat_line("d", &hb);
        assert!(line.contains("mem 50% (64/128 MiB)") && line.contains("disk /data ?"), "{line}");
        assert_eq!(disk_used_pct(&hb), None);
    }

    #[test]
    fn raw_payloads_are_escaped_and_cut() {
        assert_eq!(raw(b"a\nb"), "\"a\\nb\"");
        assert!(raw(&[b'x'; 1000]).ends_with("… (1000 bytes)"));
    }

    #[test]
    fn table_aligns() {
        let rows = vec![vec!["ID".into(), "V".into()], vec!["long-id".into(), "1".into()]];
        assert_eq!(table(&rows), "ID       V\nlong-id  1\n");
    }
}
