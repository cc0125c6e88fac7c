//! Signed requests against the real OpenSSH tools: keys made by `ssh-keygen`, requests signed by
//! `ssh-keygen -Y sign` and by `ssh-agent`, device signatures checked by `ssh-keygen -Y verify`.
//! A missing tool fails the test, saying which: these tests prove the format is OpenSSH's own.

mod common;

use common::ssh::{askpass, keygen, keygen_with_passphrase, output_of, public_line, run, SshAgent};
use serde_json::{json, Map, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tether::trust::signer::{sign_with_key_file, Agent};
use tether::trust::{
    check_request, verify_init, Addressed, AgeLimit, AuthorizedKeys, DeviceKey, PublicKey, Refusal, Request,
    SshSig, Verified, CLOCK_SANE_AFTER, DEVICE_NAMESPACE, REQUEST_NAMESPACE,
};

const NOW: u64 = CLOCK_SANE_AFTER + 86_400;
const WEEK: AgeLimit = AgeLimit { max_age_s: 7 * 86_400, clock_sane_after: CLOCK_SANE_AFTER };
const REBOOT: Addressed = Addressed { device: "dev1", op: "reboot", id: "r1" };

/// The key types a device accepts, as `ssh-keygen -t` makes them.
const KEY_TYPES: &[(&str, &[&str])] = &[
    ("ed25519", &["-t", "ed25519"]),
    ("ecdsa", &["-t", "ecdsa", "-b", "256"]),
    ("rsa", &["-t", "rsa", "-b", "3072"]),
];

/// `ssh-keygen -Y sign -n NAMESPACE -f KEY` over `message`, as an operator would run it.
fn openssh_sign(key: &Path, namespace: &str, message: &str, extra: &[&str]) -> String {
    let file = key.with_extension(format!("msg-{namespace}"));
    fs::write(&file, message).unwrap();
    let _ = fs::remove_file(file.with_extension(format!("msg-{namespace}.sig")));
    run(Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", namespace])
        .args(extra)
        .arg("-f")
        .arg(key)
        .arg(&file));
    fs::read_to_string(format!("{}.sig", file.display())).unwrap()
}

fn request(op: &str, issued: u64) -> String {
    Request::new("dev1", op, "r1", issued, Map::new()).to_text()
}

fn init(text: &str, sig: &str) -> Map<String, Value> {
    json!({"request": text, "sig": sig}).as_object().cloned().unwrap()
}

/// Verifies, then checks against REBOOT's topic at NOW.
fn accept(text: &str, sig: &str, keys: &AuthorizedKeys) -> Result<Verified, Refusal> {
    let verified = verify_init(&init(text, sig), keys)?;
    check_request(&verified.request, REBOOT, NOW, WEEK)?;
    Ok(verified)
}

/// `ssh-keygen -l`'s `SHA256:` fingerprint of a public key file.
fn openssh_fingerprint(public_key: &Path) -> String {
    let listed = run(Command::new("ssh-keygen").args(["-l", "-E", "sha256", "-f"]).arg(public_key));
    String::from_utf8_lossy(&listed.stdout).split_whitespace().nth(1).unwrap().to_string()
}

/// One operator of each key type: its key file, and an authorized_keys that holds it alone.
fn operators(dir: &Path) -> Vec<(&'static str, PathBuf, AuthorizedKeys)> {
    let operator = |(name, type_args): &(&'static str, &[&str])| {
        let key = keygen(dir, name, type_args);
        let keys = AuthorizedKeys::parse(&public_line(&key));
        (*name, key, keys)
    };
    KEY_TYPES.iter().map(operator).collect()
}

#[test]
fn openssh_signatures_of_every_key_type_verify() {
    let dir = tempfile::tempdir().unwrap();
    let text = request("reboot", NOW);
    for (name, key, keys) in operators(dir.path()) {
        for hash in [&[][..], &["-O", "hashalg=sha256"]] {
            let sig = openssh_sign(&key, REQUEST_NAMESPACE, &text, hash);
            let verified = accept(&text, &sig, &keys).unwrap_or_else(|r| panic!("{name} {hash:?}: {r}"));
            assert_eq!(verified.request, Request::from_text(&text).unwrap());
            assert_eq!(verified.signer.comment, name);
            assert_eq!(
                verified.signer.fingerprint,
                openssh_fingerprint(&key.with_extension("pub")),
                "{name}"
            );
        }
    }
}

#[test]
fn tampered_messages_and_signatures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = request("reboot", NOW);
    for (name, key, keys) in operators(dir.path()) {
        let sig = openssh_sign(&key, REQUEST_NAMESPACE, &text, &[]);
        let params = text.replace("\"params\":{}", "\"params\":{\"force\":true}");
        assert_eq!(accept(&params, &sig, &keys).unwrap_err(), Refusal::BadSignature, "{name}");
        assert_eq!(accept(&format!("{text}\n"), &sig, &keys).unwrap_err(), Refusal::BadSignature, "{name}");
        let mut blob = SshSig::from_armored(&sig).unwrap().to_blob();
        let last = blob.len() - 5;
        blob[last] ^= 1;
        let tampered = SshSig::from_blob(&blob).unwrap().to_armored();
        assert_eq!(accept(&text, &tampered, &keys).unwrap_err(), Refusal::BadSignature, "{name}");
    }
}

#[test]
fn foreign_namespaces_unknown_and_restricted_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let alice = keygen(dir.path(), "alice", &["-t", "ed25519"]);
    let ci = keygen(dir.path(), "ci", &["-t", "ecdsa", "-b", "256"]);
    let mallory = keygen(dir.path(), "mallory", &["-t", "ed25519"]);
    let keys = AuthorizedKeys::parse(&format!(
        "# operators\n{}\nops=\"ping,config\" {}\n",
        public_line(&alice),
        public_line(&ci)
    ));
    let text = request("reboot", NOW);

    let git = openssh_sign(&alice, "git", &text, &[]);
    assert_eq!(
        accept(&text, &git, &keys).unwrap_err().to_string(),
        "signature for namespace \"git\", not \"tether\""
    );
    let strange = openssh_sign(&mallory, REQUEST_NAMESPACE, &text, &[]);
    let fingerprint = openssh_fingerprint(&mallory.with_extension("pub"));
    assert_eq!(accept(&text, &strange, &keys).unwrap_err(), Refusal::UnknownKey(fingerprint));

    let restricted = openssh_sign(&ci, REQUEST_NAMESPACE, &text, &[]);
    let refusal = accept(&text, &restricted, &keys).unwrap_err();
    let fingerprint = openssh_fingerprint(&ci.with_extension("pub"));
    assert_eq!(refusal.to_string(), format!("key ci {fingerprint} is not allowed op \"reboot\""));
    let ping = request("ping", NOW);
    let allowed =
        verify_init(&init(&ping, &openssh_sign(&ci, REQUEST_NAMESPACE, &ping, &[])), &keys).unwrap();
    assert_eq!((allowed.request.op.as_str(), allowed.signer.comment.as_str()), ("ping", "ci"));
}

#[test]
fn keys_a_device_cannot_check_are_refused_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let text = request("reboot", NOW);
    let cases = [
        ("p384", &["-t", "ecdsa", "-b", "384"][..], "ecdsa-sha2-nistp384"),
        ("rsa1024", &["-t", "rsa", "-b", "1024"], "ssh-rsa of 1024 bits (2048 to 8192 are accepted)"),
    ];
    for (name, type_args, why) in cases {
        let key = keygen(dir.path(), name, type_args);
        let keys = AuthorizedKeys::parse(&public_line(&key));
        assert!(keys.is_empty(), "{name}: its line is skipped");
        let sig = openssh_sign(&key, REQUEST_NAMESPACE, &text, &[]);
        assert_eq!(accept(&text, &sig, &keys), Err(Refusal::UnsupportedAlgorithm(why.into())));
    }
}

#[test]
fn old_future_and_misaddressed_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "alice", &["-t", "ed25519"]);
    let keys = AuthorizedKeys::parse(&public_line(&key));
    let signed = |text: &str| accept(text, &openssh_sign(&key, REQUEST_NAMESPACE, text, &[]), &keys);
    let week = WEEK.max_age_s;
    assert_eq!(
        signed(&request("reboot", NOW - week - 60)),
        Err(Refusal::TooOld { age_s: week + 60, max_age_s: week })
    );
    assert_eq!(signed(&request("reboot", NOW + 3_600)), Err(Refusal::IssuedInFuture { ahead_s: 3_600 }));
    assert_eq!(signed(&request("ping", NOW)), Err(Refusal::OtherOp("ping".into())));
    let elsewhere = Request::new("dev2", "reboot", "r1", NOW, Map::new()).to_text();
    assert_eq!(signed(&elsewhere), Err(Refusal::OtherDevice("dev2".into())));
    let other_id = Request::new("dev1", "reboot", "r0", NOW, Map::new()).to_text();
    assert_eq!(signed(&other_id), Err(Refusal::OtherId("r0".into())));
    // A board whose clock starts at 1970 cannot tell old from new: the request runs.
    let old = request("reboot", NOW - 30 * 86_400);
    let verified =
        verify_init(&init(&old, &openssh_sign(&key, REQUEST_NAMESPACE, &old, &[])), &keys).unwrap();
    assert_eq!(check_request(&verified.request, REBOOT, 600, WEEK), Ok(()));
}

#[test]
fn ssh_agent_signs_with_every_key_type() {
    let dir = tempfile::tempdir().unwrap();
    let agent = SshAgent::start(dir.path());
    let mut lines = Vec::new();
    for (name, type_args) in KEY_TYPES {
        let key = keygen(dir.path(), name, type_args);
        agent.add(&key);
        lines.push(public_line(&key));
    }
    let keys = AuthorizedKeys::parse(&lines.join("\n"));
    let mut client = Agent::connect(&agent.socket).unwrap();
    let identities = client.identities().unwrap();
    let comments: Vec<&str> = identities.iter().map(|i| i.comment.as_str()).collect();
    assert_eq!(comments, ["ed25519", "ecdsa", "rsa"]);
    let text = request("reboot", NOW);
    for identity in &identities {
        assert!(identity.is_supported());
        let sig = client.sign_sshsig(&identity.key_blob, REQUEST_NAMESPACE, text.as_bytes()).unwrap();
        let verified = accept(&text, &sig, &keys).unwrap_or_else(|r| panic!("{}: {r}", identity.comment));
        assert_eq!(verified.signer.comment, identity.comment);
    }
    let stranger = DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap();
    let refused = client.sign_sshsig(stranger.public_blob(), REQUEST_NAMESPACE, text.as_bytes()).unwrap_err();
    assert!(refused.starts_with("ssh-agent refused"), "{refused}");
}

#[test]
fn key_files_sign_through_ssh_keygen_passphrase_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let text = request("reboot", NOW);
    for (name, key, keys) in operators(dir.path()) {
        let sig = sign_with_key_file(&key, REQUEST_NAMESPACE, text.as_bytes()).unwrap();
        assert_eq!(accept(&text, &sig, &keys).unwrap().signer.comment, name);
    }
    let missing =
        sign_with_key_file(&dir.path().join("nothing"), REQUEST_NAMESPACE, text.as_bytes()).unwrap_err();
    assert!(missing.starts_with("ssh-keygen -Y sign -f "), "{missing}");

    // ssh-keygen asks for the passphrase; SSH_ASKPASS stands in for the operator at the terminal.
    let protected = keygen_with_passphrase(dir.path(), "protected", &["-t", "ed25519"], "secret words");
    std::env::set_var("SSH_ASKPASS", askpass(dir.path(), "secret words"));
    std::env::set_var("SSH_ASKPASS_REQUIRE", "force");
    let sig = sign_with_key_file(&protected, REQUEST_NAMESPACE, text.as_bytes());
    std::env::remove_var("SSH_ASKPASS_REQUIRE");
    std::env::remove_var("SSH_ASKPASS");
    let keys = AuthorizedKeys::parse(&public_line(&protected));
    assert_eq!(accept(&text, &sig.unwrap(), &keys).unwrap().signer.comment, "protected");
}

#[test]
fn device_signatures_verify_here_and_with_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let device = DeviceKey::load(&DeviceKey::generate().unwrap()).unwrap();
    let answer = r#"{"status":"successful","result":{"version":"0.1.0"}}"#;
    let sig = device.sign_sshsig(DEVICE_NAMESPACE, answer.as_bytes());
    let parsed = SshSig::from_armored(&sig).unwrap();
    assert_eq!(parsed.verify(device.public_key(), DEVICE_NAMESPACE, answer.as_bytes()), Ok(()));
    assert!(matches!(
        parsed.verify(device.public_key(), REQUEST_NAMESPACE, answer.as_bytes()),
        Err(Refusal::WrongNamespace { .. })
    ));

    let public = dir.path().join("dev1.pub");
    fs::write(&public, device.openssh_public("dev1")).unwrap();
    assert_eq!(openssh_fingerprint(&public), device.fingerprint());
    let allowed = dir.path().join("allowed_signers");
    fs::write(&allowed, format!("dev1 {}\n", device.openssh_public(""))).unwrap();
    let (message, sig_file) = (dir.path().join("answer"), dir.path().join("answer.sig"));
    fs::write(&message, answer).unwrap();
    fs::write(&sig_file, &sig).unwrap();
    let verify = |namespace: &str| {
        output_of(
            Command::new("ssh-keygen")
                .args(["-Y", "verify", "-n", namespace, "-I", "dev1", "-f"])
                .arg(&allowed)
                .arg("-s")
                .arg(&sig_file)
                .stdin(fs::File::open(&message).unwrap()),
        )
    };
    let accepted = verify(DEVICE_NAMESPACE);
    assert!(accepted.status.success(), "ssh-keygen -Y verify: {}", String::from_utf8_lossy(&accepted.stderr));
    assert!(!verify(REQUEST_NAMESPACE).status.success());
}

/// A tiny xorshift, so the "random" inputs are the same on every run.
fn pseudo_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn random_and_truncated_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut blobs = Vec::new();
    let text = request("reboot", NOW);
    for (name, type_args) in KEY_TYPES {
        let key = keygen(dir.path(), name, type_args);
        lines.push(public_line(&key));
        blobs.push(
            SshSig::from_armored(&openssh_sign(&key, REQUEST_NAMESPACE, &text, &[])).unwrap().to_blob(),
        );
    }
    let keys = AuthorizedKeys::parse(&lines.join("\n"));
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for blob in &blobs {
        for cut in 0..=blob.len() {
            let _ = SshSig::from_blob(&blob[..cut]);
        }
        // Every byte changed, one at a time: each change is refused, none panics.
        for at in 0..blob.len() {
            let mut mutated = blob.clone();
            mutated[at] ^= 1 + (pseudo_random(&mut seed) % 255) as u8;
            let Ok(sig) = SshSig::from_blob(&mutated) else { continue };
            let _ = PublicKey::from_blob(sig.signer_blob());
            assert!(accept(&text, &sig.to_armored(), &keys).is_err(), "byte {at} changed, still accepted");
        }
        let armored = SshSig::from_blob(blob).unwrap().to_armored();
        // Only the last newline may go.
        for cut in 0..armored.len() - 1 {
            assert!(accept(&text, &armored[..cut], &keys).is_err());
        }
    }
    for key in keys.iter() {
        let blob = key.key.blob();
        (0..blob.len()).for_each(|cut| assert!(PublicKey::from_blob(&blob[..cut]).is_err()));
    }
    for len in 0..2_000 {
        let bytes: Vec<u8> = (0..len % 300).map(|_| pseudo_random(&mut seed) as u8).collect();
        let _ = (SshSig::from_blob(&bytes), PublicKey::from_blob(&bytes));
        let mut sshsig = b"SSHSIG\0\0\0\x01".to_vec();
        sshsig.extend_from_slice(&bytes);
        let _ = SshSig::from_blob(&sshsig);
        let line = String::from_utf8_lossy(&bytes);
        let _ = AuthorizedKeys::parse(&line);
        let _ = verify_init(&init(&line, &line), &keys);
    }
    for line in &lines {
        (0..line.len()).for_each(|cut| drop(AuthorizedKeys::parse(&line[..cut])));
    }
}
