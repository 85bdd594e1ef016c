//! The binary's command line: help, configuration errors, certificate pinning.

use crate::support::{TestClient, TestServer, voipc};

#[test]
fn help_lists_the_subcommands() {
    let out = voipc().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for subcommand in ["serve", "join", "bench", "devices", "mic-test"] {
        assert!(help.contains(subcommand), "{help}");
    }
}

#[test]
fn bare_voipc_opens_the_app_or_says_why_it_cannot() {
    let out = voipc().env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY").output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("cannot open the window") && stderr.contains("DISPLAY"), "{stderr}");
}

/// `voipc voipc://...` (how the desktop entry hands a link over) opens the app; anything
/// else that is not a subcommand is an error, not a server address.
#[test]
fn a_link_opens_the_app_and_a_mistyped_subcommand_is_an_error() {
    let run = |arg: &str| voipc().env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY").arg(arg).output().unwrap();
    let typo = run("serv");
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("not a subcommand, nor a voipc:// link"), "{typo:?}");
    let broken = run("voipc://bad host:1/");
    assert!(String::from_utf8_lossy(&broken.stderr).contains("invalid value"), "{broken:?}");
    let link = run(&format!("voipc://127.0.0.1:9987/?fp={}&channel=Lobby", "ab".repeat(32)));
    assert!(String::from_utf8_lossy(&link.stderr).contains("cannot open the window"), "the app: {link:?}");
}

#[test]
fn an_invalid_config_is_refused_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.toml"), "max_users = 10\n\n[[channels]]\nname = \"\"\n").unwrap();
    let out = voipc().current_dir(dir.path()).args(["serve", "--config", "server.toml"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("server.toml:3:1: channel name is empty"), "{stderr}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "a refused config writes nothing");
}

#[test]
fn an_unknown_certificate_needs_a_fingerprint_or_explicit_trust() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let mut blind = TestClient::join(&server.addr, "alice", &[]);
    let error = blind.expect_error("unknown_certificate");
    assert!(error["message"].as_str().unwrap().contains(&server.fingerprint), "{error}");
    assert!(!blind.wait().success());

    let mut pinned = TestClient::join(&server.addr, "bob", &["--fingerprint", &server.fingerprint]);
    pinned.expect_joined("Lobby");
    let mut wrong = TestClient::join(&server.addr, "carol", &["--fingerprint", &"00".repeat(32)]);
    wrong.expect_error("certificate_changed");
    assert!(!wrong.wait().success());
}

#[test]
fn a_pinned_server_whose_certificate_changed_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(first_dir.path(), None);
    let addr = first.addr.clone();
    let old_fp = first.fingerprint.clone();

    let mut alice = TestClient::join_with_data(&addr, "alice", &["--trust-on-first-use"], data.path());
    alice.expect_joined("Lobby");
    assert!(alice.quit().success());
    // Pinned now: no flag needed to come back.
    let mut again = TestClient::join_with_data(&addr, "alice", &[], data.path());
    again.expect_joined("Lobby");
    assert!(again.quit().success());
    assert!(first.stop().success());

    // Another server (another certificate) on the same address.
    let second_dir = tempfile::tempdir().unwrap();
    let second = TestServer::start_with(second_dir.path(), None, &["--listen", &addr]);
    assert_ne!(second.fingerprint, old_fp);
    for extra in [&[][..], &["--trust-on-first-use"][..]] {
        let mut alice = TestClient::join_with_data(&addr, "alice", extra, data.path());
        let error = alice.expect_error("certificate_changed");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(&old_fp) && message.contains(&second.fingerprint), "{message}");
        assert!(!alice.wait().success());
    }
    // A crafted invite naming the new certificate does not replace the pin either.
    let crafted = format!("voipc://{addr}/?fp={}", second.fingerprint);
    let mut alice = TestClient::join_with_data(&crafted, "alice", &[], data.path());
    let error = alice.expect_error("certificate_changed");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(&old_fp) && message.contains(&second.fingerprint), "{message}");
    assert!(!alice.wait().success());
    // The operator confirmed the new certificate: giving it explicitly replaces the pin.
    let mut alice = TestClient::join_with_data(&addr, "alice", &["--fingerprint", &second.fingerprint], data.path());
    alice.expect_joined("Lobby");
    assert!(alice.quit().success());
    let mut again = TestClient::join_with_data(&addr, "alice", &[], data.path());
    again.expect_joined("Lobby");
    assert!(again.quit().success());
    // Now the old server's invite is the one that does not match the pin.
    let stale = format!("voipc://{addr}/?fp={old_fp}");
    let mut alice = TestClient::join_with_data(&stale, "alice", &[], data.path());
    alice.expect_error("certificate_changed");
}

#[test]
fn a_configured_certificate_is_used_and_an_ephemeral_one_is_never_written() {
    let first_dir = tempfile::tempdir().unwrap();
    let first = TestServer::start(first_dir.path(), None);
    let fingerprint = first.fingerprint.clone();
    assert!(first.stop().success());

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(first_dir.path().join("server-cert.pem"), dir.path().join("my.crt")).unwrap();
    std::fs::copy(first_dir.path().join("server-key.pem"), dir.path().join("my.key")).unwrap();
    let config = "certificate = \"my.crt\"\nprivate_key = \"my.key\"\n";
    let server = TestServer::start(dir.path(), Some(config));
    assert_eq!(server.fingerprint, fingerprint);
    let mut alice = TestClient::join(&server.invite, "alice", &[]);
    alice.expect_joined("Lobby");
    assert!(alice.quit().success());
    assert!(server.stop().success());
    assert!(!dir.path().join("server-cert.pem").exists(), "no certificate generated beside a configured one");

    let empty = tempfile::tempdir().unwrap();
    let ephemeral = TestServer::start_with(empty.path(), None, &["--listen", "127.0.0.1:0", "--ephemeral-cert"]);
    let mut bob = TestClient::join(&ephemeral.invite, "bob", &[]);
    bob.expect_joined("Lobby");
    assert!(bob.quit().success());
    assert!(ephemeral.stop().success());
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0, "an ephemeral certificate stays in memory");
}

#[test]
fn the_benches_run_end_to_end_and_report_json() {
    let out = voipc().args(["bench", "relay", "--secs", "0.5", "--max-members", "2", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for side in ["quic", "udp_baseline"] {
        let level = &report[side][0];
        assert_eq!(level["members"], 2, "{report}");
        assert!(level["forwarded_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(report["quic"][0]["cpu_s_per_million"].is_number(), "the server's CPU is measured: {report}");
    assert!(report["ratio_to_baseline"].is_number(), "{report}");

    let out = voipc().args(["bench", "vault", "--rounds", "1", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["kdf"], serde_json::json!({"m_kib": 65536, "t": 3, "p": 4}));
    assert!(report["unlock_ms"].as_f64().unwrap() > 0.0, "{report}");

    let out = voipc().args(["bench", "chat", "--secs", "0.1", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["channel_members"], 20);
    for rate in ["dm_encrypt_decrypt_per_sec", "channel_messages_per_sec", "aes_gcm_seal_open_per_sec"] {
        assert!(report[rate].as_f64().unwrap() > 0.0, "{rate}: {report}");
    }
}

#[test]
fn the_client_keeps_its_pins_in_a_password_protected_vault() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let data = tempfile::tempdir().unwrap();
    let mut alice = TestClient::join_with_data(&server.invite, "alice", &[], data.path());
    alice.expect_joined("Lobby");
    assert!(alice.quit().success());
    let mut names: Vec<_> = std::fs::read_dir(data.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["lock", "vault"], "the vault and its (empty) lock file");
    assert_eq!(std::fs::metadata(data.path().join("lock")).unwrap().len(), 0);
    let sealed = std::fs::read(data.path().join("vault")).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains(&server.addr), "the pin is not readable without the password");

    let join = |extra: &[&str], env: Option<&str>| {
        let mut command = voipc();
        command.args(["join", &server.addr, "--name", "bob", "--json", "--data-dir"]).arg(data.path()).args(extra);
        if let Some(password) = env {
            command.env("VOIPC_VAULT_PASSWORD", password);
        }
        let out = command.stdin(std::process::Stdio::null()).output().unwrap();
        let event: serde_json::Value =
            serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
        (out.status.success(), event)
    };
    let (ok, event) = join(&[], None);
    assert!(!ok);
    assert_eq!(event["code"], "vault_password_missing", "{event}");
    let (ok, event) = join(&[], Some("not the password"));
    assert!(!ok);
    assert_eq!(event["code"], "vault_wrong_password", "{event}");

    // The right password from a file: the stored pin is used, no fingerprint needed.
    let password_file = data.path().join("../vault-password");
    std::fs::write(&password_file, "test vault password\n").unwrap();
    let (ok, event) = join(&["--vault-password-file", password_file.to_str().unwrap()], None);
    assert!(ok, "{event}");
    assert_eq!(event["event"], "connected", "{event}");
}

#[test]
fn a_second_client_on_the_same_data_directory_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), None);
    let data = tempfile::tempdir().unwrap();
    let mut alice = TestClient::join_with_data(&server.invite, "alice", &[], data.path());
    alice.expect_joined("Lobby");
    let mut again = TestClient::join_with_data(&server.invite, "alice2", &[], data.path());
    let error = again.expect_error("data_dir_in_use");
    assert!(error["message"].as_str().unwrap().contains("in use by another VoIPC"), "{error}");
    assert!(!again.wait().success());
    assert!(alice.quit().success());
}

#[test]
fn a_channel_password_comes_from_a_file_or_the_environment_never_from_argv() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[[channels]]\nname = \"Lobby\"\n\n[[channels]]\nname = \"Staff\"\npassword = \"s3cret\"\n";
    let server = TestServer::start(dir.path(), Some(config));
    // A password in the arguments would show in everyone's process list: refused.
    let argv = voipc()
        .env("VOIPC_VAULT_PASSWORD", "v")
        .args(["join", &server.invite, "--name", "a", "--channel", "Staff", "--password", "s3cret"])
        .output()
        .unwrap();
    assert!(!argv.status.success());
    assert!(String::from_utf8_lossy(&argv.stderr).contains("--password"), "{argv:?}");

    let file = dir.path().join("channel-password");
    std::fs::write(&file, "s3cret\n").unwrap();
    let file_arg = ["--channel-password-file", file.to_str().unwrap()];
    for (name, env, extra) in [("by-env", Some("s3cret"), &[][..]), ("by-file", None, &file_arg[..])] {
        let data = dir.path().join(name);
        let mut command = voipc();
        command.env("VOIPC_VAULT_PASSWORD", "v");
        if let Some(password) = env {
            command.env("VOIPC_CHANNEL_PASSWORD", password);
        }
        let out = command
            .args(["join", &server.invite, "--name", name, "--channel", "Staff", "--json", "--duration", "1"])
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(r#""event":"joined","channel":2,"name":"Staff""#), "{name}: {stdout}");
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_locked_down() {
    // systemd's own checker, where the machine has it (Debian does).
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: the unit is not checked here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/voipc.service")).unwrap();
    let unit = unit.replace("/usr/bin/voipc", env!("CARGO_BIN_EXE_voipc"));
    let path = dir.path().join("voipc.service");
    std::fs::write(&path, unit).unwrap();
    let verify = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    assert!(verify.status.success() && verify.stderr.is_empty(), "{verify:?}");
    let security =
        std::process::Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&path).output().unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let level: f32 = report
        .lines()
        .find_map(|l| l.split("exposure level for voipc.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    assert!(level <= 2.0, "exposure {level}: {report}");
}
