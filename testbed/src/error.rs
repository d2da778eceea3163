use std::io;

/// Why building, using or tearing down a lab failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lab description cannot be built; the message names the field.
    #[error("invalid lab spec: {0}")]
    Spec(String),
    /// A command ran but exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A command could not be started (is the program installed?).
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The error from exec.
        source: io::Error,
    },
    /// A `Command` given to [`Netns::spawn`](crate::Netns::spawn) was not built
    /// with that namespace's [`Netns::command`](crate::Netns::command), so it
    /// would run in the host's namespace.
    #[error("refusing to spawn `{command}`: build it with Netns::command so it runs in {netns}")]
    NotInNamespace {
        /// The command line.
        command: String,
        /// The namespace it was meant for.
        netns: String,
    },
    /// Signalling or waiting for a spawned process failed.
    #[error("process {pid} (`{command}`): {source}")]
    Process {
        /// Its pid.
        pid: u32,
        /// Its command line.
        command: String,
        /// The error, with its errno.
        source: io::Error,
    },
    /// A system call made for a namespace failed.
    #[error("{what} in namespace {netns}: {source}")]
    Io {
        /// The namespace.
        netns: String,
        /// What was being done.
        what: String,
        /// The error, with its errno.
        source: io::Error,
    },
}
