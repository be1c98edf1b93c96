//! Runs the data-plane tools (`nft`, `iptables-restore`, `ip`, ...) for every backend.
//!
//! Shared seam (written with the nftables backend; the iptables and IPVS backends are welcome to use
//! it too): a [`Runner`] runs one tool with optional stdin, optionally inside a network namespace
//! (`ip netns exec NS tool ...`), so that the kernel tests can program a throwaway namespace with
//! exactly the code the agent runs on a node. A failing tool becomes [`DataPlaneError::Apply`] with
//! its stderr; a tool that cannot be started becomes [`DataPlaneError::Spawn`].

use std::process::Stdio;

use tokio::{io::AsyncWriteExt, process::Command};

use crate::dataplane::DataPlaneError;

/// Where the tools run: this process's network namespace, or a named one (`ip netns add NAME`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runner {
    netns: Option<String>,
}

impl Runner {
    /// Runs tools in the agent's own network namespace (the node's, on a real node).
    pub fn host() -> Self {
        Self { netns: None }
    }

    /// Runs tools inside the named network namespace through `ip netns exec`.
    pub fn in_netns(name: impl Into<String>) -> Self {
        Self { netns: Some(name.into()) }
    }

    /// The network namespace the tools run in, if not the agent's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs `tool args...`, feeding `stdin` if given, and returns its stdout.
    ///
    /// A non-zero exit status is an error carrying the tool's stderr (or stdout, if stderr is empty).
    pub async fn run(
        &self,
        tool: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, DataPlaneError> {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), tool]);
                c
            }
            None => Command::new(tool),
        };
        command
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child =
            command.spawn().map_err(|source| DataPlaneError::Spawn { tool: tool.to_owned(), source })?;

        // Write stdin while the tool runs and its output is drained, so a large payload or a large
        // answer cannot deadlock on a full pipe.
        let pipe = child.stdin.take();
        let feed = async move {
            if let (Some(mut pipe), Some(input)) = (pipe, stdin) {
                let written = pipe.write_all(input).await;
                // Dropping the pipe closes it: the tool sees end of input.
                drop(pipe);
                written
            } else {
                Ok(())
            }
        };
        let (fed, output) = tokio::join!(feed, child.wait_with_output());
        let output = output.map_err(|source| DataPlaneError::Spawn { tool: tool.to_owned(), source })?;

        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stdout = String::from_utf8_lossy(&output.stdout);
            let detail = if stderr.trim().is_empty() { stdout.trim() } else { stderr.trim() };
            return Err(DataPlaneError::Apply {
                tool: tool.to_owned(),
                message: format!("{} ({})", detail, output.status),
            });
        }
        // The tool succeeded, so it read what it needed; a write error here (it closed stdin early)
        // would only matter if it had failed.
        if let Err(error) = fed {
            tracing::debug!(tool, %error, "writing stdin failed, but the tool succeeded");
        }
        String::from_utf8(output.stdout).map_err(|e| DataPlaneError::Apply {
            tool: tool.to_owned(),
            message: format!("output is not UTF-8: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_stdout_and_feeds_stdin() {
        let out = Runner::host().run("cat", &[], Some(b"hello")).await.expect("cat runs");
        assert_eq!(out, "hello");
    }

    #[tokio::test]
    async fn failure_carries_stderr() {
        let err =
            Runner::host().run("sh", &["-c", "echo boom >&2; exit 3"], None).await.expect_err("sh fails");
        match err {
            DataPlaneError::Apply { tool, message } => {
                assert_eq!(tool, "sh");
                assert!(message.contains("boom"), "{message}");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[tokio::test]
    async fn missing_tool_is_a_spawn_error() {
        let err = Runner::host().run("fleetproxy-no-such-tool", &[], None).await.expect_err("no tool");
        assert!(matches!(err, DataPlaneError::Spawn { .. }), "{err:?}");
    }
}
