use std::io;

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened (not Linux, or no permission).
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] io::Error),
    /// `/dev/net/tun` could not be opened or the device attached.
    #[error("cannot create or attach TUN interface {name:?}: {source}{hint}")]
    Tun {
        /// The interface name.
        name: String,
        /// The errno from open/ioctl.
        #[source]
        source: io::Error,
        /// What the operator can do about it.
        hint: &'static str,
    },
    /// An interface with the wanted name exists but is not a TUN device; we
    /// never delete somebody else's interface.
    #[error(
        "interface {name:?} already exists and is a {kind} device, not a TUN; \
         remove it (`ip link del {name}`) or choose another `interface` name"
    )]
    NotTun {
        /// The interface name.
        name: String,
        /// The link kind the kernel reports.
        kind: String,
    },
    /// A route we were asked to build is not valid (a prefix or next hop of
    /// the wrong family).
    #[error("invalid route to {dst}: {why}")]
    InvalidRoute {
        /// The destination.
        dst: ipnet::IpNet,
        /// What is wrong with it.
        why: String,
    },
    /// An interface with the wanted name exists and is of another kind; we
    /// never delete somebody else's interface.
    #[error(
        "interface {name:?} already exists and is a {kind} device, not {wanted}; \
         remove it (`ip link del {name}`) or choose another name"
    )]
    NotOurs {
        /// The interface name.
        name: String,
        /// The link kind the kernel reports.
        kind: String,
        /// The kind we would have created.
        wanted: &'static str,
    },
    /// An interface disappeared right after we created it.
    #[error("interface {0:?} vanished right after it was created")]
    Vanished(String),
    /// A netlink request failed.
    #[error("netlink: {op}: {source}")]
    Request {
        /// What we were doing, e.g. `add route 10.1.0.0/16 dev causeway0`.
        op: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

impl Error {
    pub(crate) fn request(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Request {
            op: op.into(),
            source,
        }
    }
}

/// The errno in a netlink error answer, if that is what it is.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}
