//! What the nftables kernel tests share: a throwaway network namespace with `nft` in it.
// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
};

use serde_json::Value;

pub fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(uid, "0", "these tests program nftables in throwaway network namespaces and need root");
}

/// A throwaway network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// `tag` names the namespace (with the test process' pid): keep it unique within a test crate.
    pub fn new(tag: &str) -> Self {
        require_root();
        let name = format!("fpt-{}-{tag}", std::process::id());
        let status = Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns add");
        assert!(status.success(), "ip netns add {name}");
        Self(name)
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// `nft ARGS` in the namespace, with `stdin` fed to it: its output, or its error output.
    pub fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "nft"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        if let Some(input) = stdin {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("feed nft");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("nft output");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `nft -c -f` of the script, which must pass.
    pub fn check(&self, script: &str) {
        if let Err(e) = self.nft(&["-c", "-f", "-"], Some(script)) {
            panic!("nft -c refused the script:\n{e}");
        }
    }

    /// `nft -f` of the script, which must pass.
    pub fn apply(&self, script: &str) {
        if let Err(e) = self.nft(&["-f", "-"], Some(script)) {
            panic!("nft -f refused the script:\n{e}");
        }
    }

    pub fn ruleset(&self) -> String {
        self.nft(&["list", "ruleset"], None).expect("list ruleset")
    }

    /// Every table, normalized: chain → rule expressions, set/map → declaration and sorted
    /// elements, keyed by family and table. Handles and creation order are left out.
    pub fn snapshot(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let json = self.nft(&["-j", "list", "ruleset"], None).expect("list ruleset");
        let value: Value = serde_json::from_str(&json).expect("nft json");
        let place = |object: &Value| {
            format!(
                "{} {}",
                object["family"].as_str().expect("family"),
                object["table"].as_str().expect("table")
            )
        };
        for object in value["nftables"].as_array().expect("array") {
            if let Some(rule) = object.get("rule") {
                let key = format!("{} chain {}", place(rule), rule["chain"].as_str().expect("chain"));
                let entry = out.entry(key).or_insert_with(|| Value::Array(Vec::new()));
                entry.as_array_mut().expect("array").push(rule["expr"].clone());
            } else if let Some(chain) = object.get("chain") {
                let mut chain = chain.clone();
                chain.as_object_mut().expect("object").remove("handle");
                let name = chain["name"].as_str().expect("name").to_owned();
                out.entry(format!("{} chain {name}", place(&chain)))
                    .or_insert_with(|| Value::Array(Vec::new()));
                out.insert(format!("{} chain-def {name}", place(&chain)), chain);
            } else if let Some(set) = object.get("set").or_else(|| object.get("map")) {
                let mut set = set.clone();
                let key = format!("{} set {}", place(&set), set["name"].as_str().expect("name"));
                let object = set.as_object_mut().expect("object");
                object.remove("handle");
                if let Some(Value::Array(elements)) = object.get_mut("elem") {
                    elements.sort_by_key(|e| e.to_string());
                }
                out.insert(key, set);
            } else if let Some(table) = object.get("table") {
                let family = table["family"].as_str().expect("family");
                out.insert(format!("{family} {} table", table["name"].as_str().expect("name")), Value::Null);
            }
        }
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
