//! Who this device is: `device_id` from the config, or an id derived once from the machine
//! (/etc/machine-id, else the first MAC address) and kept in the state directory so it never
//! changes, even if the machine id does.

use std::fs;
use std::path::Path;

use crate::config::Config;
use crate::fsutil;
use crate::protocol::check_device_id;

const ID_FILE: &str = "device-id";

pub fn device_id(config: &Config) -> Result<String, String> {
    if let Some(id) = &config.device_id {
        return Ok(id.clone());
    }
    let path = config.state_dir.join(ID_FILE);
    if let Ok(Some(bytes)) = fsutil::read_optional(&path) {
        let id = String::from_utf8_lossy(&bytes).trim().to_string();
        match check_device_id(&id) {
            Ok(()) => return Ok(id),
            Err(why) => log::warn!("{}: ignoring the device id in it: {why}", path.display()),
        }
    }
    let id =
        derive_id().ok_or("cannot derive a device id (no /etc/machine-id, no MAC address): set device_id")?;
    let saved = fsutil::create_private_dir(&config.state_dir)
        .and_then(|_| fsutil::write_atomic(&path, format!("{id}\n").as_bytes()));
    if let Err(e) = saved {
        log::warn!("cannot save device id to {}: {e}", path.display());
    }
    Ok(id)
}

fn derive_id() -> Option<String> {
    machine_id().or_else(first_mac)
}

fn machine_id() -> Option<String> {
    let text = fs::read_to_string("/etc/machine-id").ok()?;
    let id = text.trim().to_ascii_lowercase();
    (id.len() >= 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id.bytes().any(|b| b != b'0'))
        .then_some(id)
}

/// The lowest-named interface's MAC that is a real one (not loopback, not all zeros).
fn first_mac() -> Option<String> {
    let mut names: Vec<_> =
        fs::read_dir("/sys/class/net").ok()?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    names.sort();
    names.iter().find_map(|name| {
        let addr = fs::read_to_string(Path::new("/sys/class/net").join(name).join("address")).ok()?;
        let hex: String = addr.trim().chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
        (hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && hex != "000000000000")
            .then_some(hex)
    })
}

/// The kernel's id of this boot; `TETHER_BOOT_ID_FILE` names another file to read (tests
/// stand in for a reboot by changing it).
pub fn boot_id() -> String {
    let path =
        std::env::var_os("TETHER_BOOT_ID_FILE").unwrap_or_else(|| "/proc/sys/kernel/random/boot_id".into());
    fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}
