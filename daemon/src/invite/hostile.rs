//! Hostile tokens: whatever a token holds, `join` either refuses it with
//! an error naming the field, or appends exactly one peer (and its
//! rendezvous) whose values are the token's. Unit tests of the walls, then
//! a bounded randomized pass over [`Invite::decode`] and the appended text.

#![allow(clippy::unwrap_used)] // tests may panic

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Value, json};

use super::append::{append_peer, check_appended, quote};
use super::fixtures::*;
use super::*;

/// A token holding `json` as it is.
fn token(json: &Value) -> String {
    token_of(&json.to_string())
}

/// A valid token's JSON with `field` set to `value`.
fn with(field: &str, value: Value) -> Value {
    let mut json = json!({
        "v": 1, "site": "pharma", "public_key": KEY_A, "pod_cidrs": ["10.0.0.0/16"],
    });
    json[field] = value;
    json
}

/// The error for a token with `field` set to `value`: it must be refused.
fn refusal(field: &str, value: Value) -> TokenError {
    let json = with(field, value);
    match Invite::decode(&token(&json)) {
        Ok(invite) => panic!("{json} was accepted: {invite:?}"),
        Err(e) => e,
    }
}

/// The peer line a reviewer used: a site name that ends `join`'s comment
/// and adds a peer of its own, taking half of the IPv4 Internet.
fn injection() -> String {
    format!("x\n[[peer]]\nname = \"evil\"\npublic_key = \"{KEY_A}\"\ncidrs = [\"128.0.0.0/1\"]\n#")
}

fn hospital(dir: &std::path::Path) -> (String, Config<Parsed>) {
    let text = site_config(
        dir,
        "",
        &format!("[[peer]]\nname = \"lab\"\npublic_key = \"{KEY_B}\"\ncidrs = [\"10.9.0.0/16\"]\n"),
    );
    let config = config::parse(&text, "c.toml").unwrap();
    (text, config)
}

#[test]
fn hostile_site_names_are_refused_in_one_line() {
    let long = "a".repeat(2000);
    for site in [
        injection().as_str(),
        "a\"b",
        "a]]",
        "a\\",
        "[[peer]]",
        "a\u{0}",
        "a\r",
        "a\u{1b}[2J",
        "a\u{2028}b",
        "A",
        "é",
        "a b",
        "",
        &"a".repeat(33),
        &long,
    ] {
        let err = refusal("site", json!(site));
        let TokenError::Invalid { field, reason } = &err else {
            panic!("{site:?}: {err:?}")
        };
        assert_eq!(field, "site", "{site:?}");
        assert!(reason.contains("is not a valid site name"), "{reason}");
        let message = err.to_string();
        assert!(!message.contains(|c: char| c.is_control()), "{message:?}");
        assert!(message.len() < 400, "{} bytes: {message}", message.len());
    }
    let err = refusal("site", json!(injection())).to_string();
    assert!(err.contains(r#"invalid site: "x\n[[peer]]"#), "{err}");
    assert!(err.contains("ask the other site for a new token"), "{err}");
    assert!(
        refusal("site", json!(long))
            .to_string()
            .contains("… (2000 characters)")
    );
}

#[test]
fn hostile_endpoints_and_rendezvous_are_refused() {
    let hostile = [
        "x\":1",
        "gw:1\"\n[[peer]]",
        "a\n[[peer]]:1",
        "]]:1",
        "gw\u{7}:1",
        "gw:1 # c",
        "[::1]]:1",
    ];
    for spec in hostile {
        let err = refusal("endpoints", json!(["gw:1", spec])).to_string();
        assert!(err.contains("invalid endpoints[1]"), "{spec:?}: {err}");
        let err = refusal(
            "rendezvous",
            json!([{"address": spec, "public_key": KEY_R}]),
        )
        .to_string();
        assert!(err.contains("invalid rendezvous[0].address"), "{err}");
        let err = refusal(
            "rendezvous",
            json!([{"address": "r:7443", "public_key": KEY_R, "stun": spec}]),
        )
        .to_string();
        assert!(err.contains("invalid rendezvous[0].stun"), "{err}");
    }
    for key in [
        "",
        "\"",
        &format!("{KEY_A}\n[[peer]]"),
        &format!("{}\"", &KEY_A[..43]),
    ] {
        let err = refusal("public_key", json!(key)).to_string();
        assert!(err.contains("invalid public_key"), "{key:?}: {err}");
    }
}

#[test]
fn too_broad_or_special_pod_cidrs_are_refused() {
    let refused = [
        ("0.0.0.0/0", "0.0.0.0/0 is the default route"),
        ("::/0", "::/0 is the default route"),
        ("0.0.0.0/1", "0.0.0.0/1 is broader than /8"),
        ("128.0.0.0/1", "128.0.0.0/1 is broader than /8"),
        ("10.0.0.0/7", "10.0.0.0/7 is broader than /8"),
        ("2000::/3", "2000::/3 is broader than /32"),
        ("fd00::/31", "fd00::/31 is broader than /32"),
        ("0.0.0.0/8", "overlaps 0.0.0.0/8 (\"this network\")"),
        ("127.0.0.0/8", "overlaps 127.0.0.0/8 (loopback)"),
        ("127.0.0.1/32", "overlaps 127.0.0.0/8 (loopback)"),
        ("169.254.0.0/16", "overlaps 169.254.0.0/16 (link-local)"),
        ("169.254.169.254/32", "(link-local)"),
        ("224.0.0.0/8", "overlaps 224.0.0.0/4 (multicast)"),
        (
            "240.0.0.0/8",
            "overlaps 240.0.0.0/4 (reserved and broadcast)",
        ),
        ("239.1.0.0/16", "(multicast)"),
        ("255.255.255.255/32", "(reserved and broadcast)"),
        ("::/128", "overlaps ::/128 (unspecified)"),
        ("::1/128", "overlaps ::1/128 (loopback)"),
        ("::/32", "overlaps ::/128 (unspecified)"),
        ("::ffff:10.0.0.0/104", "(IPv4-mapped)"),
        ("fe80::/64", "overlaps fe80::/10 (link-local)"),
        ("ff02::1/128", "overlaps ff00::/8 (multicast)"),
        ("10.0.0.1/16", "has host bits set"),
        ("10.0.0.0/33", "is not a valid CIDR"),
        ("10.0.0.0/16\n", "is not a valid CIDR"),
    ];
    for (cidr, expected) in refused {
        let err = refusal("pod_cidrs", json!(["192.168.0.0/16", cidr])).to_string();
        assert!(
            err.contains("invalid pod_cidrs[1]: ") && err.contains(expected),
            "{cidr}: {err}"
        );
    }
    let err = refusal("pod_cidrs", json!(["0.0.0.0/1"])).to_string();
    assert!(err.contains("each /8 or narrower"), "{err}");
    let err = refusal("pod_cidrs", json!(["10.0.0.0/16", "10.0.5.0/24"])).to_string();
    assert!(
        err.contains("invalid pod_cidrs[1]: 10.0.5.0/24 overlaps pod_cidrs[0] 10.0.0.0/16"),
        "{err}"
    );

    // As broad as allowed, and ordinary pod networks.
    for cidr in [
        "10.0.0.0/8",
        "100.64.0.0/10",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "11.0.0.0/8",
        "fd00::/32",
        "2001:db8::/32",
        "fd00:10::/64",
        "10.1.2.3/32",
    ] {
        let json = with("pod_cidrs", json!([cidr]));
        let invite = Invite::decode(&token(&json)).unwrap();
        assert_eq!(invite.pod_cidrs[0].to_string(), cidr);
    }
}

#[test]
fn huge_and_malformed_tokens_are_refused() {
    // Longer than any token `invite` prints.
    let huge = format!("cw1.{}", "A".repeat(MAX_TOKEN_LEN));
    assert_eq!(
        Invite::decode(&huge),
        Err(TokenError::TooLong {
            len: MAX_TOKEN_LEN + 4
        })
    );
    let err = refusal("endpoints", json!(vec!["gw:1"; 2000]));
    assert!(matches!(err, TokenError::TooLong { .. }), "{err:?}");
    // Whitespace is not counted: a wrapped token of the longest length is
    // read.
    let mut json = with("endpoints", json!([]));
    let mut i = 0;
    while token(&json).len() < MAX_TOKEN_LEN - 20 {
        json["endpoints"]
            .as_array_mut()
            .unwrap()
            .push(json!(format!("gw{i}.example:1")));
        i += 1;
    }
    let wrapped: String = token(&json).chars().flat_map(|c| [c, '\n']).collect();
    assert!(Invite::decode(&wrapped).is_ok());

    // Deep nesting, control characters, duplicate or mistyped fields.
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    for json in [
        deep.as_str(),
        "{\"v\":1,\"site\":\"a\u{0}\"}",
        r#"{"v":1,"v":1,"site":"a","public_key":"K","pod_cidrs":["10.0.0.0/16"]}"#,
        r#"{"v":1,"site":["a"],"public_key":"K","pod_cidrs":["10.0.0.0/16"]}"#,
        r#"{"v":-1,"site":"a","public_key":"K","pod_cidrs":["10.0.0.0/16"]}"#,
        r#"{"v":1,"site":"a","public_key":"K","pod_cidrs":"10.0.0.0/16"}"#,
    ] {
        let json = json.replace("\"K\"", &format!("{KEY_A:?}"));
        let err = Invite::decode(&token_of(&json)).unwrap_err();
        assert!(matches!(err, TokenError::Damaged { .. }), "{json}: {err:?}");
    }
    // Bad base64 and other versions.
    for text in ["cw1.ab%d", "cw1.Zm9v\u{0}", "cw1.====x", "cw1.é"] {
        let err = Invite::decode(text).unwrap_err();
        assert!(
            matches!(err, TokenError::Damaged { .. }),
            "{text:?}: {err:?}"
        );
    }
    let json = with("v", json!(2));
    assert_eq!(
        Invite::decode(&token(&json)),
        Err(TokenError::Version { found: 2 })
    );
}

#[test]
fn an_injected_invite_never_reaches_the_file() {
    // Not decoded from a token: made in code, so only `append_peer`'s own
    // check stands between it and the file.
    let dir = tempfile::tempdir().unwrap();
    let (text, current) = hospital(dir.path());
    let mut theirs = sample();
    theirs.public_key = key(KEY_R);
    theirs.site = injection();
    let err = append_peer(&text, "c.toml", &current, &key(KEY_A), &theirs, Some("a")).unwrap_err();
    let JoinError::Token(TokenError::Invalid { field, .. }) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(field, "site");

    let mut theirs = sample();
    theirs.public_key = key(KEY_R);
    theirs.pod_cidrs = vec!["0.0.0.0/1".parse().unwrap()];
    let err = append_peer(&text, "c.toml", &current, &key(KEY_A), &theirs, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid pod_cidrs[0]: 0.0.0.0/1 is broader than /8"),
        "{err}"
    );
}

#[test]
fn the_result_must_hold_just_the_one_new_peer() {
    let dir = tempfile::tempdir().unwrap();
    let (text, current) = hospital(dir.path());
    let mut theirs = sample();
    theirs.public_key = key(KEY_R);
    theirs.rendezvous.clear();
    let good = append_peer(&text, "c.toml", &current, &key(KEY_A), &theirs, None).unwrap();
    assert!(check_appended(&current, &good.config, "pharma", &theirs, &[]).is_ok());

    // The text the old `join` wrote for the injection: it parses, with an
    // extra peer hidden in the comment.
    let peer = good.text[text.len()..].replace(
        "# Peer pharma",
        &format!("# Peer pharma (site {})", injection()),
    );
    let injected = config::parse(&format!("{text}{peer}"), "c.toml").unwrap();
    assert_eq!(injected.peers.len(), 3);
    let why = check_appended(&current, &injected, "pharma", &theirs, &[]).unwrap_err();
    assert_eq!(
        why,
        r#"hold the peers ["lab", "evil", "pharma"] instead of ["lab"] and "pharma""#
    );

    // Other values than the token's, a rendezvous or a site setting more.
    let other = config::parse(&good.text.replace("10.0.0.0/16", "10.0.0.0/8"), "c.toml").unwrap();
    assert!(check_appended(&current, &other, "pharma", &theirs, &[]).is_err());
    let more = format!(
        "{}\n[[rendezvous]]\naddress = \"r:7443\"\npublic_key = \"{KEY_R}\"\n",
        good.text
    );
    let more = config::parse(&more, "c.toml").unwrap();
    let why = check_appended(&current, &more, "pharma", &theirs, &[]).unwrap_err();
    assert!(
        why.contains("hold 1 [[rendezvous]] tables instead of 0"),
        "{why}"
    );
    let site = good.text.replacen("[site]\n", "[site]\nmtu = 1300\n", 1);
    let site = config::parse(&site, "c.toml").unwrap();
    let why = check_appended(&current, &site, "pharma", &theirs, &[]).unwrap_err();
    assert_eq!(why, "change the [site] table");
}

/// Strings made to break TOML and JSON: pieces of tables, quotes, escapes,
/// newlines and control characters.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        r#"[a-z0-9\-\n\r\t"'\[\]=#:./\\ \x00\x1b\x7f\u{2028}é]{0,24}"#,
        any::<String>(),
        Just("x\n[[peer]]\nname = \"evil\"\ncidrs = [\"128.0.0.0/1\"]\n#".to_owned()),
        Just("gw:1\"\n[[peer]]".to_owned()),
        Just("]]".to_owned()),
    ]
}

/// Mostly valid names, and hostile strings.
fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z0-9-]{1,12}", 1 => hostile_string()]
}

/// Mostly valid `host:port`s, and hostile strings.
fn endpoint_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9-]{1,12}(\\.[a-z]{1,5})?:[1-9][0-9]{0,3}",
        1 => any::<std::net::SocketAddr>().prop_map(|a| a.to_string()),
        1 => hostile_string(),
    ]
}

fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<[u8; 32]>().prop_map(|b| STANDARD.encode(b)),
        1 => hostile_string(),
    ]
}

fn cidr_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => (any::<[u8; 4]>(), 0u8..=32).prop_map(|(a, len)| format!(
            "{}/{len}",
            std::net::Ipv4Addr::from(a)
        )),
        3 => (any::<[u8; 4]>(), 6u8..=32).prop_map(|(a, len)| {
            let net = ipnet::Ipv4Net::new(a.into(), len).unwrap();
            net.trunc().to_string()
        }),
        2 => (any::<[u16; 8]>(), 28u8..=128).prop_map(|(a, len)| {
            let net = ipnet::Ipv6Net::new(a.into(), len).unwrap();
            net.trunc().to_string()
        }),
        1 => hostile_string(),
    ]
}

prop_compose! {
    /// A token's JSON with hostile or valid values in every field.
    fn hostile_json()(
        site in name_text(),
        public_key in key_text(),
        pod_cidrs in prop::collection::vec(cidr_text(), 0..3),
        endpoints in prop::collection::vec(endpoint_text(), 0..3),
        rendezvous in prop::collection::vec(
            (endpoint_text(), key_text(), prop::option::of(endpoint_text())), 0..3),
    ) -> Value {
        let rendezvous: Vec<Value> = rendezvous
            .into_iter()
            .map(|(address, public_key, stun)| match stun {
                Some(stun) => json!({"address": address, "public_key": public_key, "stun": stun}),
                None => json!({"address": address, "public_key": public_key}),
            })
            .collect();
        json!({
            "v": 1, "site": site, "public_key": public_key, "pod_cidrs": pod_cidrs,
            "endpoints": endpoints, "rendezvous": rendezvous,
        })
    }
}

/// Whatever `token` is: `decode` does not panic, and an invite it accepts
/// encodes back to itself and joins as exactly one more peer with the
/// token's values, or is refused for a reason the file gives.
fn decode_and_join(token: &str) -> Result<bool, TestCaseError> {
    let Ok(invite) = Invite::decode(token) else {
        return Ok(false);
    };
    prop_assert_eq!(Invite::decode(&invite.encode()), Ok(invite.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (text, current) = hospital(dir.path());
    let own = key(KEY_R);
    match append_peer(&text, "c.toml", &current, &own, &invite, None) {
        Ok(appended) => {
            prop_assert!(appended.text.starts_with(&text));
            let after = config::parse(&appended.text, "c.toml").unwrap();
            prop_assert_eq!(after.peers.len(), 2);
            prop_assert_eq!(&after.peers[0], &current.peers[0]);
            let peer = &after.peers[1];
            prop_assert_eq!(&peer.name, &invite.site);
            prop_assert_eq!(peer.public_key, invite.public_key);
            prop_assert_eq!(&peer.cidrs, &invite.pod_cidrs);
            prop_assert_eq!(
                peer.endpoint.as_ref().map(|e| e.spec.as_str()),
                invite.endpoints.first().map(String::as_str)
            );
            prop_assert_eq!(after.rendezvous.len(), appended.rendezvous_added.len());
        }
        Err(JoinError::OwnToken { .. }) => prop_assert_eq!(invite.public_key, own),
        Err(JoinError::PeerExists { .. }) => {
            prop_assert!(invite.site == "lab" || invite.public_key == current.peers[0].public_key)
        }
        Err(e) => prop_assert!(false, "accepted token refused by join: {e}"),
    }
    Ok(true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_decoded_or_refused_without_panic(text in any::<String>()) {
        decode_and_join(&text)?;
        decode_and_join(&format!("cw1.{text}"))?;
    }

    #[test]
    fn any_bytes_in_a_token_are_decoded_or_refused(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_and_join(&format!("cw1.{}", URL_SAFE_NO_PAD.encode(bytes)))?;
    }

    #[test]
    fn hostile_values_join_as_one_peer_or_not_at_all(json in hostile_json()) {
        decode_and_join(&token(&json))?;
    }

    #[test]
    fn quoted_values_stay_on_their_line(value in any::<String>()) {
        let line = format!("key = {}\n", quote(&value));
        prop_assert_eq!(line.lines().count(), 1);
        let table: toml::Table = toml::from_str(&line).unwrap();
        prop_assert_eq!(table["key"].as_str(), Some(value.as_str()));
    }
}

/// The randomized pass reaches both outcomes: hostile tokens are not all
/// refused for one trivial reason.
#[test]
fn the_hostile_generator_makes_accepted_tokens_too() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..400 {
        let json = hostile_json().new_tree(&mut runner).unwrap().current();
        if decode_and_join(&token(&json)).unwrap() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        accepted >= 10 && refused >= 10,
        "{accepted} accepted, {refused} refused"
    );
}
