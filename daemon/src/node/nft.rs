//! The node agent's nftables table, through the `nft` binary.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::plan::NFT_TABLE;

/// Why an `nft` call failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The binary could not be run.
    #[error("cannot run nft (the nftables package must be installed, and in the image): {0}")]
    Spawn(#[source] std::io::Error),
    /// nft refused the request.
    #[error("nft {what} failed: {stderr}")]
    Failed {
        /// What we asked.
        what: &'static str,
        /// What nft said.
        stderr: String,
    },
}

fn run(args: &[&str], stdin: Option<&str>, what: &'static str) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            what,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces the table with `script` (one transaction: all or nothing).
pub fn apply(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(script), "-f (replace table)").map(|_| ())
}

/// Deletes the table; a missing table is success.
pub fn remove() -> Result<(), NftError> {
    apply(&super::plan::reset_table())
}

/// The packets counted by each named counter of the table (one `nft`
/// run); `None` when the table does not exist.
pub fn counters() -> Result<Option<BTreeMap<String, u64>>, NftError> {
    let out = match run(
        &["-j", "list", "counters", "table", "inet", NFT_TABLE],
        None,
        "list counters",
    ) {
        Ok(out) => out,
        Err(NftError::Failed { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(parse_counters(&out)))
}

/// Counter name → packets, from `nft -j list counters` output.
fn parse_counters(json: &str) -> BTreeMap<String, u64> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return BTreeMap::new();
    };
    value
        .get("nftables")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let counter = item.get("counter")?;
            Some((
                counter.get("name")?.as_str()?.to_owned(),
                counter.get("packets")?.as_u64()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_nft_json_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "inet", "name": "masqueraded", "table": "causeway_node", "handle": 3, "packets": 42, "bytes": 3528}}, {"counter": {"family": "inet", "name": "host_dropped", "table": "causeway_node", "handle": 4, "packets": 0, "bytes": 0}}]}"#;
        let counters = super::parse_counters(json);
        assert_eq!(counters.get("masqueraded"), Some(&42));
        assert_eq!(counters.get("host_dropped"), Some(&0));
        assert!(super::parse_counters("not json").is_empty());
        assert!(super::parse_counters(r#"{"nftables": []}"#).is_empty());
    }
}
