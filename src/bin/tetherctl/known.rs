//! known_devices: the key of each device seen so far, as ssh's known_hosts keeps hosts' keys.
//! Trust on first use: the key a device's status presents the first time is recorded; a
//! different one later stops tetherctl, as it may be someone passing for the device (a broker
//! in the middle), until the user forgets the old key. One line a device,
//! `DEVICE ssh-ed25519 BASE64`; other lines (comments, blank) are kept as they are.
//! `tetherctl known-devices` lists the file, `known-devices forget DEVICE` removes a key.

use std::collections::HashMap;
use std::path::PathBuf;

use tether::fsutil::{error_text, read_optional, write_atomic};
use tether::protocol::Status;
use tether::text::Printable;
use tether::trust::PublicKey;

use crate::settings::TrustSettings;
use crate::{exit, print, Failure};

/// Past this many devices recorded at once, one line says how many rather than one line each.
const NEW_DEVICES_LISTED: usize = 10;

pub struct KnownDevices {
    /// None: no home directory to keep it in; nothing is remembered.
    path: Option<PathBuf>,
    /// The file's lines as read, and those added: written back in this order.
    lines: Vec<String>,
    /// Each device's first line, numbered from 1, and what it says.
    entries: HashMap<String, (usize, Result<PublicKey, String>)>,
    modified: bool,
}

/// What a device's status says of its key, against the file.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// No key in the status, or none that can be read (an agent older than device keys).
    NoKey,
    Known(PublicKey),
    /// Recorded now.
    New(PublicKey),
    Changed {
        recorded: PublicKey,
        presented: PublicKey,
        line: usize,
    },
    /// The file's line for this device cannot be read: nothing can be compared with it.
    Unreadable {
        line: usize,
        why: String,
    },
}

impl KnownDevices {
    pub fn load(trust: &TrustSettings) -> Result<KnownDevices, Failure> {
        let path = trust.known_devices.clone();
        let text = match &path {
            Some(path) => read_optional(path)
                .map_err(|e| {
                    Failure::config(format!("known_devices {}: {}", path.display(), error_text(&e)))
                })?
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default(),
            None => String::new(),
        };
        let mut known = KnownDevices { path, lines: Vec::new(), entries: HashMap::new(), modified: false };
        for line in text.lines() {
            known.push_line(line.to_string());
        }
        Ok(known)
    }

    fn push_line(&mut self, line: String) {
        let number = self.lines.len() + 1;
        if let Some((device, key)) = parse_line(&line) {
            self.entries.entry(device.to_string()).or_insert((number, key));
        }
        self.lines.push(line);
    }

    /// The key recorded for `device`; an unreadable line is an error naming it.
    pub fn recorded(&self, device: &str) -> Result<Option<&PublicKey>, Failure> {
        match self.entries.get(device) {
            None => Ok(None),
            Some((_, Ok(key))) => Ok(Some(key)),
            Some((line, Err(why))) => Err(Failure::config(self.unreadable(device, *line, why))),
        }
    }

    /// Compares the key `status` presents with the one recorded, recording it if there is none.
    pub fn see(&mut self, device: &str, status: Option<&Status>) -> Seen {
        let Some(presented) = presented_key(device, status) else { return Seen::NoKey };
        match self.entries.get(device) {
            Some((_, Ok(recorded))) if *recorded == presented => Seen::Known(presented),
            Some((line, Ok(recorded))) => {
                Seen::Changed { recorded: recorded.clone(), presented, line: *line }
            }
            Some((line, Err(why))) => Seen::Unreadable { line: *line, why: why.clone() },
            None => {
                self.push_line(format!("{device} {}", presented.to_openssh()));
                self.modified = true;
                Seen::New(presented)
            }
        }
    }

    /// Removes every line of `device`; false when it had none.
    pub fn forget(&mut self, device: &str) -> bool {
        let lines = std::mem::take(&mut self.lines);
        let before = lines.len();
        self.entries.clear();
        for line in lines.into_iter().filter(|line| line.split_whitespace().next() != Some(device)) {
            self.push_line(line);
        }
        let forgotten = self.lines.len() != before;
        self.modified |= forgotten;
        forgotten
    }

    /// Writes the file if anything changed: atomically, readable by this user only.
    pub fn save(&mut self) -> Result<(), Failure> {
        if !std::mem::take(&mut self.modified) {
            return Ok(());
        }
        let Some(path) = &self.path else {
            eprintln!(
                "tetherctl: device keys are not remembered: neither HOME nor XDG_CONFIG_HOME is set \
                 (use --known-devices FILE)"
            );
            return Ok(());
        };
        let mut text = self.lines.join("\n");
        text.push('\n');
        write_atomic(path, text.as_bytes())
            .map_err(|e| Failure::error(format!("cannot write {}: {}", path.display(), error_text(&e))))
    }

    /// `DEVICE  FINGERPRINT` for each readable line, in the file's order.
    fn listing(&self) -> Vec<(String, String)> {
        let mut listed: Vec<(usize, String, String)> = self
            .entries
            .iter()
            .map(|(device, (line, key))| {
                let fingerprint =
                    key.as_ref().map_or_else(|why| format!("unreadable: {why}"), PublicKey::fingerprint);
                (*line, device.clone(), fingerprint)
            })
            .collect();
        listed.sort();
        listed.into_iter().map(|(_, device, fingerprint)| (device, fingerprint)).collect()
    }

    pub fn path_text(&self) -> String {
        self.path.as_ref().map_or("(none)".into(), |p| p.display().to_string())
    }

    pub fn unreadable(&self, device: &str, line: usize, why: &str) -> String {
        format!(
            "known_devices {} line {line}: the key of {device} cannot be read ({why}); correct the line, \
             or remove it with: tetherctl known-devices forget {device}",
            self.path_text()
        )
    }
}

/// `DEVICE KEYTYPE BASE64`: the device and its key; None for blank and comment lines.
fn parse_line(line: &str) -> Option<(&str, Result<PublicKey, String>)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (device, key) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    Some((device, PublicKey::from_openssh(key).map_err(|e| e.to_string())))
}

/// The key in a device's status; an unreadable one is said and ignored, like no key at all.
fn presented_key(device: &str, status: Option<&Status>) -> Option<PublicKey> {
    let status = status?;
    let line = status.key.as_deref()?;
    match PublicKey::from_openssh(line) {
        Ok(key) => {
            if status.fingerprint.as_ref().is_some_and(|f| *f != key.fingerprint()) {
                log::warn!("{device}: the status's fingerprint is not its key's; the key's is used");
            }
            Some(key)
        }
        Err(e) => {
            log::warn!("{device}: the key in its status cannot be read ({e}): \"{}\"", Printable(line));
            None
        }
    }
}

/// The loud warning, as ssh's for a changed host key, with the command that accepts the
/// change.
pub fn changed_key_warning(device: &str, seen: &Seen, known: &KnownDevices, trust: &TrustSettings) -> String {
    let Seen::Changed { recorded, presented, line } = seen else { return String::new() };
    let rule = "@".repeat(64);
    format!(
        "\n{rule}\n@    WARNING: THE KEY OF DEVICE {device} HAS CHANGED!\n{rule}\n\
         IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
         Someone may be passing for {device} (the broker, or anyone who can publish there), or the\n\
         device made a new key (re-flashed, or its state_dir wiped).\n\
         Presented now:  {}\n\
         Recorded:       {} (known_devices {} line {line})\n\
         Check the new fingerprint on the device itself. If the change is expected, forget the old\n\
         key, and the next contact records the new one:\n  {}\n",
        presented.fingerprint(),
        recorded.fingerprint(),
        known.path_text(),
        forget_command(device, trust),
    )
}

/// `tetherctl [--known-devices FILE] known-devices forget DEVICE`, ready to paste.
pub fn forget_command(device: &str, trust: &TrustSettings) -> String {
    let mut words = vec!["tetherctl".to_string()];
    words.extend(trust.known_devices_options.iter().map(|w| shell_quoted(w)));
    words.extend(["known-devices".into(), "forget".into(), device.to_string()]);
    words.join(" ")
}

fn shell_quoted(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Says on stderr which devices were met for the first time.
pub fn announce_new(known: &KnownDevices, new: &[(String, String)]) {
    if new.len() > NEW_DEVICES_LISTED {
        eprintln!("tetherctl: recorded the keys of {} new devices in {}", new.len(), known.path_text());
        return;
    }
    for (device, fingerprint) in new {
        eprintln!(
            "tetherctl: {device} is a new device: recorded its key {fingerprint} in {}",
            known.path_text()
        );
    }
}

/// `tetherctl known-devices [forget DEVICE...]`.
pub fn run(trust: &TrustSettings, forget: &[String]) -> Result<u8, Failure> {
    let mut known = KnownDevices::load(trust)?;
    if forget.is_empty() {
        let listing = known.listing();
        if listing.is_empty() {
            eprintln!("tetherctl: no device key is recorded in {}", known.path_text());
        }
        let rows: Vec<String> =
            listing.iter().map(|(device, fingerprint)| format!("{device} {fingerprint}")).collect();
        return if rows.is_empty() {
            Ok(exit::SUCCESS)
        } else {
            print(&rows.join("\n")).map(|()| exit::SUCCESS)
        };
    }
    let missing: Vec<&str> = forget.iter().filter(|d| !known.forget(d)).map(String::as_str).collect();
    if !missing.is_empty() {
        return Err(Failure::error(format!(
            "no key is recorded for {} in {}; nothing forgotten",
            missing.join(", "),
            known.path_text()
        )));
    }
    known.save()?;
    for device in forget {
        print(&format!("forgot the key of {device}"))?;
    }
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::trust::DeviceKey;

    fn key() -> PublicKey {
        DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap().public_key().clone()
    }

    fn status(key: &PublicKey) -> Option<Status> {
        Some(Status {
            key: Some(key.to_openssh()),
            fingerprint: Some(key.fingerprint()),
            ..Status::offline()
        })
    }

    fn trust(path: PathBuf) -> TrustSettings {
        TrustSettings { known_devices: Some(path), ..Default::default() }
    }

    #[test]
    fn first_contact_records_the_key_and_a_change_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let trust = trust(dir.path().join("tether").join("known_devices"));
        let (first, second) = (key(), key());
        let mut known = KnownDevices::load(&trust).unwrap();
        assert_eq!(known.see("dev1", None), Seen::NoKey);
        assert_eq!(known.see("dev1", status(&first).as_ref()), Seen::New(first.clone()));
        known.save().unwrap();

        let mut known = KnownDevices::load(&trust).unwrap();
        assert_eq!(known.see("dev1", status(&first).as_ref()), Seen::Known(first.clone()));
        let changed = known.see("dev1", status(&second).as_ref());
        assert_eq!(changed, Seen::Changed { recorded: first.clone(), presented: second.clone(), line: 1 });
        let warning = changed_key_warning("dev1", &changed, &known, &trust);
        assert!(
            warning.contains(&first.fingerprint()) && warning.contains(&second.fingerprint()),
            "{warning}"
        );
        assert!(warning.contains("\n  tetherctl known-devices forget dev1\n"), "{warning}");
        assert!(known.forget("dev1") && !known.forget("dev1"));
        assert_eq!(known.see("dev1", status(&second).as_ref()), Seen::New(second));
    }

    #[test]
    fn the_file_is_private_and_keeps_the_lines_it_does_not_know() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_devices");
        let garbled = "dev2 ssh-ed25519 AAAA";
        std::fs::write(&path, format!("# mine\n{garbled}\n")).unwrap();
        let trust = trust(path.clone());
        let mut known = KnownDevices::load(&trust).unwrap();
        assert!(matches!(known.see("dev2", status(&key()).as_ref()), Seen::Unreadable { line: 2, .. }));
        assert!(known.recorded("dev2").unwrap_err().message.contains("line 2"));
        let dev1 = key();
        known.see("dev1", status(&dev1).as_ref());
        known.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("# mine\n{garbled}\ndev1 {}\n", dev1.to_openssh()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn the_accept_command_points_at_the_same_file() {
        let given = TrustSettings {
            known_devices_options: vec!["--known-devices".into(), "/tmp/my devices".into()],
            ..Default::default()
        };
        assert_eq!(
            forget_command("dev1", &given),
            "tetherctl --known-devices '/tmp/my devices' known-devices forget dev1"
        );
    }
}
