//! SPEC §1: the command line, run as the real binary.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wa-router");

fn run(args: &[&str], dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run wa-router");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_ok_with_the_rule_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), crate::helpers::GREETING).unwrap();
    let (code, out, _) = run(&["check"], dir.path());
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "ok: 1 rules");
}

#[test]
fn check_prints_every_error_with_file_line_col_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[rule]]\nname = \"greet\"\nwhen = { text = \"hi\" }\n\n[[rule]]\nname = \"broken order\"\nwhen = { regex = '^order (?P<n>\\d+' }\n\n[[rule]]\nname = \"typo\"\nsend = [ { type = \"txt\", body = \"x\" } ]\n";
    std::fs::write(dir.path().join("rules.toml"), text).unwrap();
    let (code, out, err) = run(&["check", "rules.toml"], dir.path());
    assert_eq!(code, 1);
    assert!(!out.contains("ok:"));
    assert!(
        err.contains("rules.toml:7:") && err.contains("broken order"),
        "{err}"
    );
    assert!(
        err.contains("rules.toml:11:") && err.contains("typo"),
        "{err}"
    );
}

/// Issue #10.5: one run names every broken rule, whatever kind of mistake
/// each has (a bad regex, an unknown key, a value of the wrong type), and
/// an unknown top-level key too.
#[test]
fn check_reports_three_different_mistakes_in_three_rules_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
[[rule]]
name = \"orders\"
when = { regex = '^order (?P<n>\\d+' }

[[rule]]
name = \"misspelt\"
sned = [ { type = \"text\", body = \"x\" } ]

[[rule]]
name = \"wrong type\"
mark_read = \"yes\"

[[rule]]
name = \"fine\"
when = { text = \"hi\" }
send = [ { type = \"text\", body = \"hello\" } ]

[extra]
x = 1
";
    std::fs::write(dir.path().join("rules.toml"), text).unwrap();
    let (code, out, err) = run(&["check", "rules.toml"], dir.path());
    assert_eq!(code, 1);
    assert!(!out.contains("ok:"));
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("rules.toml:"))
        .collect();
    assert_eq!(lines.len(), 4, "{err}");
    for (line, (at, what)) in lines.iter().zip([
        ("rules.toml:3:", "\"orders\""),
        ("rules.toml:7:", "\"misspelt\""),
        ("rules.toml:11:", "\"wrong type\""),
        ("rules.toml:18:", "extra"),
    ]) {
        assert!(
            line.starts_with(at) && line.contains(what),
            "{line:?} in\n{err}"
        );
    }
    assert!(lines[1].contains("sned"), "{err}");
}

#[test]
fn check_uses_the_config_targets_for_forward() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[rule]]\nname = \"f\"\nforward = \"agents\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["check"], dir.path());
    assert_eq!(code, 1, "no config: no targets");
    assert!(err.contains("unknown target \"agents\""), "{err}");
    std::fs::write(
        dir.path().join("wa-router.toml"),
        "[sandbox]\npublic_credentials = true\n[targets.agents]\nurl = \"http://127.0.0.1:9/x\"\nsecret = \"s\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "ok: 1 rules");
}

#[test]
fn sign_matches_hmac_from_file_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let body = b"{\"object\":\"whatsapp_business_account\",\"entry\":[]}\n";
    std::fs::write(dir.path().join("body.json"), body).unwrap();
    let expected = crate::helpers::sign(body, "s3cret");
    let (code, out, _) = run(&["sign", "--secret", "s3cret", "body.json"], dir.path());
    assert_eq!((code, out.trim()), (0, expected.as_str()));
    let mut child = Command::new(BIN)
        .args(["sign", "--secret", "s3cret"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    // Off the command line (issue #7): from a file or the environment.
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let (code, out, _) = run(
        &["sign", "--secret-file", "secret", "body.json"],
        dir.path(),
    );
    assert_eq!((code, out.trim()), (0, expected.as_str()));
    let out = Command::new(BIN)
        .args(["sign", "body.json"])
        .current_dir(dir.path())
        .env("WA_APP_SECRET", "s3cret")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    let out = Command::new(BIN)
        .args(["sign", "body.json"])
        .current_dir(dir.path())
        .env_remove("WA_APP_SECRET")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("secret"), "{err}");
}

#[test]
fn simulate_prints_the_rule_and_graph_bodies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), crate::helpers::GREETING).unwrap();
    let (code, out, err) = run(
        &[
            "simulate",
            "--from",
            "+16315551181",
            "--text",
            "Hello",
            "--name",
            "Ana",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON on stdout");
    assert_eq!(v["rule"], "greet");
    assert_eq!(v["messages"][0]["to"], "16315551181");
    assert_eq!(
        v["messages"][0]["interactive"]["body"]["text"],
        "Hi Ana! How can we help?"
    );
    let (_, out, _) = run(
        &[
            "simulate",
            "--from",
            "16315551181",
            "--type",
            "image",
            "--window",
            "closed",
        ],
        dir.path(),
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["rule"].is_null());
}

#[test]
fn simulate_applies_handoff_consent_and_window_like_the_router() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), crate::helpers::GREETING).unwrap();
    let sim = |extra: &[&str]| {
        let mut args = vec!["simulate", "--from", "16315551181"];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args, dir.path());
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).expect("JSON on stdout")
    };
    // Handed off: no rule runs, as in the router.
    let v = sim(&["--text", "hi", "--handoff"]);
    assert!(v["rule"].is_null(), "{v}");
    assert_eq!(v["handed_off"], true);
    assert_eq!(v["messages"], serde_json::json!([]));
    // Opted out: the rule runs, its send is refused by policy.
    let v = sim(&["--text", "hi", "--opted-out"]);
    assert_eq!(v["rule"], "greet");
    assert_eq!(v["refused"][0]["reason"], "opted_out", "{v}");
    assert_eq!(v["messages"], serde_json::json!([]));
    // A consent keyword consumes the message even while handed off.
    let v = sim(&["--text", "STOP", "--handoff"]);
    assert_eq!(v["consent"], "opt_out", "{v}");
    assert!(v["rule"].is_null());
}

#[test]
fn serve_refuses_a_bad_config_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), "").unwrap();
    std::fs::write(
        dir.path().join("wa-router.toml"),
        "listen = \"127.0.0.1:0\"\n[sender]\nmax_atempts = 3\n",
    )
    .unwrap();
    let (code, _, err) = run(&["serve"], dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("wa-router.toml:3:1:") && err.contains("max_atempts"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("wa-router.toml"),
        "[[accounts]]\nname = \"m\"\nphone_number_id = \"1\"\naccess_token = \"t\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["serve"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("live mode") && !err.contains("\"t\""), "{err}");
}
