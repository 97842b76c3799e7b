//! Who may do what: the socket's peer (SO_PEERCRED, SO_PEERGROUPS)
//! against the grants of the policy tree ([`crate::resources::access`]).
//! root may do anything.

use super::desired::Owner;
use crate::admission::StateDir;
use crate::resources::{Name, Path};

/// The peer of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// The grants in force, read once per request (only for a caller that is
/// not root).
pub struct Rights {
    peer: Peer,
}

impl Rights {
    pub fn load(_state: &StateDir, peer: &Peer) -> Result<Rights, String> {
        Ok(Rights { peer: peer.clone() })
    }

    fn root_only(&self, what: String) -> Result<(), String> {
        if self.peer.is_root() {
            Ok(())
        } else {
            Err(format!("uid {} may not {what}", self.peer.uid))
        }
    }

    pub fn may_act_on(&self, name: &Name) -> Result<(), String> {
        self.root_only(format!("act on {name}"))
    }

    pub fn may_change_policy(&self, path: &Path) -> Result<(), String> {
        self.root_only(format!("change the policy of {path}"))
    }

    pub fn may_show(&self, path: &Path) -> Result<(), String> {
        self.root_only(format!("show {path}"))
    }

    pub fn sees(&self, name: &Name) -> bool {
        self.may_act_on(name).is_ok()
    }
}
