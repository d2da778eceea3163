//! `causeway status --json` is a stable interface for scripts: a real
//! daemon's document is checked against the schema that docs/status.md
//! documents (read from the doc itself, so that a field added to the code
//! without a doc line, or documented but gone, fails here), and the text
//! output names every peer and its path.

use std::collections::{BTreeMap, BTreeSet};
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use causeway::core::DropReason;
use causeway::keys;
use serde_json::Value;

use crate::common::*;

/// The documentation the schema is read from.
const DOC: &str = include_str!("../../docs/status.md");

/// A JSON type as docs/status.md writes it.
#[derive(Debug, Clone, PartialEq)]
enum Type {
    String,
    Boolean,
    Integer,
    Number,
    Nullable(Box<Type>),
    Array(Box<Type>),
    Map(Box<Type>),
    /// An object documented in its own table (`### The `name` object`).
    Object(String),
}

impl Type {
    fn parse(text: &str) -> Type {
        let text = text.trim().replace('`', "");
        if let Some(inner) = text.strip_suffix(" or null") {
            return Type::Nullable(Box::new(Type::parse(inner)));
        }
        if let Some(inner) = text.strip_prefix("array of ") {
            return Type::Array(Box::new(Type::parse(inner)));
        }
        if let Some(inner) = text.strip_prefix("map of ") {
            return Type::Map(Box::new(Type::parse(inner)));
        }
        match text.as_str() {
            "string" => Type::String,
            "boolean" => Type::Boolean,
            "integer" => Type::Integer,
            "number" => Type::Number,
            name => {
                assert!(
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                    "docs/status.md: unknown type {text:?}"
                );
                Type::Object(name.to_owned())
            }
        }
    }
}

/// The documented objects (name → fields in order) and drop reasons.
#[derive(Debug)]
struct Schema {
    objects: BTreeMap<String, Vec<(String, Type)>>,
    reasons: BTreeSet<String>,
}

impl Schema {
    /// Reads the `| field | type | …` tables under `### The `x` object`
    /// headings and the reasons under `### Drop reasons`.
    fn from_doc(doc: &str) -> Schema {
        enum Section {
            Other,
            Object(String),
            Reasons,
        }
        let mut section = Section::Other;
        let mut objects: BTreeMap<String, Vec<(String, Type)>> = BTreeMap::new();
        let mut reasons = BTreeSet::new();
        for line in doc.lines() {
            if line.starts_with('#') {
                section = match line
                    .strip_prefix("### The `")
                    .and_then(|l| l.strip_suffix("` object"))
                {
                    Some(name) => {
                        assert!(
                            objects.insert(name.to_owned(), Vec::new()).is_none(),
                            "object {name} documented twice"
                        );
                        Section::Object(name.to_owned())
                    }
                    None if line == "### Drop reasons" => Section::Reasons,
                    None => Section::Other,
                };
                continue;
            }
            // Data rows only: they start with a back-quoted name.
            let Some(row) = line.strip_prefix("| `") else {
                continue;
            };
            let cells: Vec<&str> = row.split('|').collect();
            let name = cells[0].trim().trim_end_matches('`');
            match &section {
                Section::Object(object) => {
                    let ty = Type::parse(
                        cells
                            .get(1)
                            .unwrap_or_else(|| panic!("no type for {object}.{name}")),
                    );
                    let fields = objects.get_mut(object).expect("object");
                    assert!(
                        !fields.iter().any(|(f, _)| f == name),
                        "{object}.{name} documented twice"
                    );
                    fields.push((name.to_owned(), ty));
                }
                Section::Reasons => {
                    reasons.insert(name.to_owned());
                }
                Section::Other => {}
            }
        }
        let schema = Schema { objects, reasons };
        assert!(
            schema.objects.contains_key("status"),
            "docs/status.md documents no `status` object"
        );
        for (object, fields) in &schema.objects {
            assert!(!fields.is_empty(), "object {object} has no fields");
            for (field, ty) in fields {
                let mut ty = ty;
                while let Type::Nullable(t) | Type::Array(t) | Type::Map(t) = ty {
                    ty = t;
                }
                if let Type::Object(name) = ty {
                    assert!(
                        schema.objects.contains_key(name),
                        "{object}.{field}: object {name} is not documented"
                    );
                }
            }
        }
        schema
    }

    /// Every way `value` (found at `at`) differs from `ty`.
    fn check(&self, value: &Value, ty: &Type, at: &str, errors: &mut Vec<String>) {
        let wrong = |expected: &str| format!("{at}: expected {expected}, found {value}");
        match ty {
            Type::Nullable(inner) => {
                if !value.is_null() {
                    self.check(value, inner, at, errors);
                }
            }
            Type::String if value.is_string() => {}
            Type::String => errors.push(wrong("a string")),
            Type::Boolean if value.is_boolean() => {}
            Type::Boolean => errors.push(wrong("true or false")),
            Type::Integer if value.as_u64().is_some() => {}
            Type::Integer => errors.push(wrong("a non-negative integer")),
            Type::Number if value.is_number() => {}
            Type::Number => errors.push(wrong("a number")),
            Type::Array(inner) => match value.as_array() {
                Some(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.check(item, inner, &format!("{at}[{i}]"), errors);
                    }
                }
                None => errors.push(wrong("an array")),
            },
            Type::Map(inner) => match value.as_object() {
                Some(map) => {
                    for (key, item) in map {
                        self.check(item, inner, &format!("{at}.{key}"), errors);
                    }
                }
                None => errors.push(wrong("an object (map)")),
            },
            Type::Object(name) => {
                let Some(map) = value.as_object() else {
                    return errors.push(wrong(&format!("a {name} object")));
                };
                let fields = &self.objects[name];
                for (field, ty) in fields {
                    match map.get(field) {
                        Some(v) => self.check(v, ty, &format!("{at}.{field}"), errors),
                        None => errors.push(format!("{at}.{field}: documented but missing")),
                    }
                }
                for key in map.keys() {
                    if !fields.iter().any(|(f, _)| f == key) {
                        errors.push(format!(
                            "{at}.{key}: not documented in docs/status.md (`{name}` object)"
                        ));
                    }
                }
            }
        }
    }

    /// Every way a whole `causeway status --json` document differs from
    /// the doc, including `drops` keys that are not documented reasons.
    fn errors(&self, doc: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(doc, &Type::Object("status".into()), "$", &mut errors);
        let mut drops = vec![("$.drops".to_owned(), &doc["drops"])];
        for (i, peer) in doc["peers"].as_array().into_iter().flatten().enumerate() {
            drops.push((format!("$.peers[{i}].drops"), &peer["drops"]));
        }
        for (at, map) in drops {
            for key in map.as_object().into_iter().flat_map(|m| m.keys()) {
                if !self.reasons.contains(key) {
                    errors.push(format!("{at}.{key}: not a documented drop reason"));
                }
            }
        }
        errors
    }
}

fn status_output(socket: &std::path::Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(causeway_bin());
    cmd.arg("status");
    if json {
        cmd.arg("--json");
    }
    cmd.arg("--socket")
        .arg(socket)
        .output()
        .expect("run causeway status")
}

/// `causeway status --json` as a subprocess, parsed, and checked against
/// the schema.
fn status_json(schema: &Schema, socket: &std::path::Path) -> Value {
    let out = status_output(socket, true);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        out.status.success(),
        "causeway status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"));
    let errors = schema.errors(&doc);
    assert!(
        errors.is_empty(),
        "status --json does not match docs/status.md:\n{}\n\n{stdout}",
        errors.join("\n")
    );
    doc
}

#[test]
fn the_schema_checker_finds_every_kind_of_difference() {
    let schema = Schema::from_doc(DOC);
    // The reasons table is exactly the daemon's reasons.
    let names: BTreeSet<String> = DropReason::ALL
        .iter()
        .map(|r| r.name().to_owned())
        .collect();
    assert_eq!(
        schema.reasons, names,
        "docs/status.md `Drop reasons` differs from DropReason::ALL"
    );
    // Every documented path value is named in the doc.
    for path in ["static", "direct", "relay", "none"] {
        assert!(
            DOC.contains(&format!("`{path}`")),
            "path {path} not documented"
        );
    }

    // A document made from the schema passes.
    fn example(schema: &Schema, ty: &Type) -> Value {
        match ty {
            Type::String => Value::from("x"),
            Type::Boolean => Value::from(true),
            Type::Integer => Value::from(1u64),
            Type::Number => Value::from(1.5),
            Type::Nullable(_) => Value::Null,
            Type::Array(inner) => Value::Array(vec![example(schema, inner)]),
            Type::Map(inner) => Value::Object(
                [("malformed".to_owned(), example(schema, inner))]
                    .into_iter()
                    .collect(),
            ),
            Type::Object(name) => Value::Object(
                schema.objects[name]
                    .iter()
                    .map(|(field, ty)| (field.clone(), example(schema, ty)))
                    .collect(),
            ),
        }
    }
    let good = example(&schema, &Type::Object("status".into()));
    assert_eq!(schema.errors(&good), Vec::<String>::new());

    let mut bad = good.clone();
    bad["listen_port"] = Value::from(-1);
    bad["site"] = Value::Null;
    bad["packet_threads_alive"] = Value::from(1);
    bad["peers"][0]["tx_bytes"] = Value::from(1.5);
    bad["peers"][0]["name"] = Value::from(7);
    bad["peers"][0]["views"][0]["view"] = Value::Null;
    bad["peers"][0]["drops"]["not_a_reason"] = Value::from(1);
    bad["peers"][0]["brand_new_field"] = Value::from(1);
    bad["peers"][0]
        .as_object_mut()
        .expect("peer")
        .remove("cidrs");
    bad.as_object_mut().expect("status").remove("interface");
    let errors = schema.errors(&bad);
    for needle in [
        "$.listen_port:",
        "$.site:",
        "$.packet_threads_alive:",
        "$.interface: documented but missing",
        "$.peers[0].tx_bytes:",
        "$.peers[0].name:",
        "$.peers[0].views[0].view:",
        "$.peers[0].drops.not_a_reason: not a documented drop reason",
        "$.peers[0].brand_new_field: not documented",
        "$.peers[0].cidrs: documented but missing",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "{needle} not reported in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), 10, "{errors:#?}");
}

#[test]
fn status_json_matches_the_documented_schema_and_text_names_every_peer() {
    let schema = Schema::from_doc(DOC);
    // The classic pair, plus a peer `c` of a's that has no endpoint (and no
    // rendezvous): path `none`, and the nullable fields null.
    let c_key = keys::encode_public(&x25519_dalek::PublicKey::from(&keys::generate()));
    let extra = peer_toml("c", &c_key, &["10.2.0.0/16"], None);
    let j = Joined::with_extra_peers([&extra, ""]);
    let socket = &j.daemon(0).socket;

    // Valid before any traffic too.
    status_json(&schema, socket);

    let (pod_a, _) = j.pod(0);
    let (pod_b, addr_b) = j.pod(1);
    assert_ping(pod_a, addr_b.into());
    tcp_transfer(pod_b, addr_b, pod_a, 1 << 20);
    // Drops of every kind of map: b's gateway sends from an address b does
    // not own (spoofed_source, peer b), junk reaches a's WireGuard port from
    // the internet (malformed, the site), and a pod pings c, which has no
    // endpoint (no_endpoint, peer c).
    let gw_b = &j.site(1).gateway;
    gw_b.ip(&["addr", "add", "10.99.0.1/32", "dev", "lo"])
        .expect("spoof address");
    let spoofer = gw_b.enter(|| UdpSocket::bind("10.99.0.1:0").expect("bind spoofed source"));
    for _ in 0..5 {
        spoofer.send_to(b"spoofed", (j.pod(0).1, 9)).expect("send");
    }
    let junk = j
        .lab
        .internet()
        .enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    for i in 0..7u8 {
        junk.send_to(&[0xee, i, 1, 2, 3], (j.site(0).wan_addr, PORT))
            .expect("send junk");
    }
    assert_eq!(
        pod_a
            .ping("10.2.0.1".parse().expect("ip"), Duration::from_millis(300))
            .expect("ping"),
        None
    );
    std::thread::sleep(Duration::from_millis(300));

    let doc = status_json(&schema, socket);
    let text = serde_json::to_string_pretty(&doc).expect("json");
    assert_eq!(doc["site"], "a", "{text}");
    assert_eq!(doc["interface"], "causeway0", "{text}");
    assert_eq!(doc["public_key"], j.files[0].public_key.as_str(), "{text}");
    assert_eq!(doc["listen_port"], PORT, "{text}");
    assert_eq!(doc["packet_threads_alive"], true, "{text}");
    assert_eq!(doc["rendezvous"], serde_json::json!([]), "{text}");
    assert!(doc["drops"]["malformed"].as_u64() >= Some(7), "{text}");
    let peers = doc["peers"].as_array().expect("peers");
    let names: Vec<&str> = peers.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["b", "c"], "peers in config order");

    for p in peers {
        // `endpoint` is null exactly when there is no direct or static path.
        let path = p["path"].as_str().expect("path");
        assert!(
            ["static", "direct", "relay", "none"].contains(&path),
            "{text}"
        );
        assert_eq!(
            p["endpoint"].is_null(),
            path == "relay" || path == "none",
            "{text}"
        );
        // One view per CIDR, in order.
        let cidrs = p["cidrs"].as_array().expect("cidrs");
        let views = p["views"].as_array().expect("views");
        assert_eq!(cidrs.len(), views.len(), "{text}");
        for (cidr, view) in cidrs.iter().zip(views) {
            assert_eq!(&view["real"], cidr, "{text}");
        }
        if let Some(rtt) = p["rtt_ms"].as_f64() {
            assert!(
                (0.0..1000.0).contains(&rtt),
                "rtt_ms {rtt}: not milliseconds of a lab link\n{text}"
            );
        }
    }

    let b = &peers[0];
    assert_eq!(b["public_key"], j.files[1].public_key.as_str(), "{text}");
    assert_eq!(b["path"], "static", "{text}");
    assert_eq!(
        b["endpoint"],
        format!("{}:{PORT}", j.site(1).wan_addr),
        "{text}"
    );
    assert_eq!(b["cidrs"], serde_json::json!(["10.1.0.0/16"]), "{text}");
    assert_eq!(
        b["views"],
        serde_json::json!([{"real": "10.1.0.0/16", "view": "10.1.0.0/16"}]),
        "{text}"
    );
    let handshake = b["last_handshake_secs"].as_f64().expect("b has handshaken");
    assert!(
        (0.0..60.0).contains(&handshake),
        "last_handshake_secs {handshake}: not seconds ago\n{text}"
    );
    // The same handshake on the wall clock.
    let at = b["last_handshake_unix"]
        .as_f64()
        .expect("b's handshake time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        (at - (now - handshake)).abs() < 5.0,
        "last_handshake_unix {at}, {handshake} s before {now}\n{text}"
    );
    assert!(b["persistent_keepalive_secs"].is_null(), "{text}");
    assert!(b["tx_bytes"].as_u64() >= Some(1 << 20), "{text}");
    assert!(b["tx_packets"].as_u64() >= Some(700), "{text}");
    assert!(
        b["rx_bytes"].as_u64() > Some(0) && b["rx_packets"].as_u64() > Some(0),
        "{text}"
    );
    assert_eq!(
        (
            b["relay_tx_packets"].as_u64(),
            b["relay_rx_packets"].as_u64()
        ),
        (Some(0), Some(0)),
        "{text}"
    );
    assert!(b["drops"]["spoofed_source"].as_u64() >= Some(5), "{text}");

    let c = &peers[1];
    assert_eq!(c["path"], "none", "{text}");
    assert!(
        c["endpoint"].is_null()
            && c["last_handshake_secs"].is_null()
            && c["last_handshake_unix"].is_null()
            && c["rtt_ms"].is_null(),
        "{text}"
    );
    assert_eq!(
        (c["tx_packets"].as_u64(), c["rx_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{text}"
    );
    assert!(c["drops"]["no_endpoint"].as_u64() >= Some(1), "{text}");
    assert_eq!(c["candidates"], serde_json::json!([]), "{text}");

    // The text output: a line per peer with its name and key, and its path.
    let out = status_output(socket, false);
    assert!(out.status.success());
    let human = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        human.starts_with(&format!(
            "site a on causeway0, port {PORT}, key {}",
            j.files[0].public_key
        )),
        "{human}"
    );
    for p in peers {
        let head = format!(
            "peer {} ({})",
            p["name"].as_str().expect("name"),
            p["public_key"].as_str().expect("key")
        );
        let block = human
            .split_once(&head)
            .unwrap_or_else(|| panic!("no {head:?} in\n{human}"))
            .1;
        let block = block.split("\npeer ").next().expect("block");
        let path_line = block
            .lines()
            .find(|l| l.trim_start().starts_with("path:"))
            .unwrap_or_else(|| panic!("no path in\n{human}"));
        assert!(
            path_line.contains(p["path"].as_str().expect("path")),
            "{path_line:?}\n{human}"
        );
        if let Some(endpoint) = p["endpoint"].as_str() {
            assert!(path_line.contains(endpoint), "{path_line:?}\n{human}");
        }
    }

    // No daemon behind a socket: a failure that names it, nothing on stdout.
    let nowhere = j.files[0].path("nobody-here.sock");
    let out = status_output(&nowhere, true);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&nowhere.display().to_string()));
}
