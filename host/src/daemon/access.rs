//! Who may do what: the socket's peer (SO_PEERCRED, SO_PEERGROUPS)
//! against the grants of the policy tree ([`crate::resources::access`]).
//! root may do anything.

use super::desired::Owner;
use crate::admission::StateDir;
use crate::resources::{Caller, Name, Path, Resources};

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

    fn caller(&self) -> Caller {
        Caller {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// The grants in force, read once per request (only for a caller that is
/// not root).
pub struct Rights {
    caller: Caller,
    tree: Resources,
}

impl Rights {
    pub fn load(state: &StateDir, peer: &Peer) -> Result<Rights, String> {
        Ok(Rights {
            caller: peer.caller(),
            tree: state.resources().map_err(|e| e.to_string())?,
        })
    }

    pub fn may_act_on(&self, name: &Name) -> Result<(), String> {
        (self.tree.may_act_on_unikernel(&self.caller, name)).map_err(|e| e.to_string())
    }

    pub fn may_change_policy(&self, path: &Path) -> Result<(), String> {
        (self.tree.may_change_policy(&self.caller, path)).map_err(|e| e.to_string())
    }

    pub fn may_show(&self, path: &Path) -> Result<(), String> {
        (self.tree.may_show(&self.caller, path)).map_err(|e| e.to_string())
    }

    pub fn sees(&self, name: &Name) -> bool {
        self.tree.visible_to(&self.caller, name)
    }
}
