//! Links: look up, configure, delete.

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::LinkUnspec;

use crate::error::errno;
use crate::{Error, Netlink};

/// What the kernel says about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Link kind (`tun`, `veth`, …), empty when the kernel reports none.
    pub kind: String,
    /// Current MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The most segments the kernel puts into one offloaded packet for it.
    pub gso_max_segs: u32,
    /// Has carrier; a TUN has it while a process holds it open.
    pub carrier: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: String::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            gso_max_segs: 0,
            carrier: false,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::GsoMaxSegs(segs) => link.gso_max_segs = *segs,
                LinkAttribute::Carrier(carrier) => link.carrier = *carrier != 0,
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = match kind {
                                InfoKind::Tun => "tun".to_owned(),
                                other => other.to_string(),
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

impl Netlink {
    /// The link called `name`, or `None`.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Error::request(format!("get link {name}"), e)),
        }
    }

    /// Sets the MTU, caps offloaded packets at [`crate::MAX_SEGMENTS`]
    /// segments (what [`crate::Tun::recv_segments`] can split; the kernel
    /// segments bigger ones itself) and brings the link up. Idempotent.
    pub async fn ensure_link_up(&self, link: &Link, mtu: u32) -> Result<(), Error> {
        let segs = crate::MAX_SEGMENTS as u32;
        if link.up && link.mtu == mtu && link.gso_max_segs == segs {
            return Ok(());
        }
        let mut msg = LinkUnspec::new_with_index(link.index).mtu(mtu).up().build();
        msg.attributes.push(LinkAttribute::GsoMaxSegs(segs));
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| Error::request(format!("set link {} mtu {mtu} up", link.name), e))
    }

    /// Deletes the link; a link that is already gone is success.
    pub async fn delete_link(&self, link: &Link) -> Result<(), Error> {
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(Error::request(format!("delete link {}", link.name), e)),
        }
    }
}
