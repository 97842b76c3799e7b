//! Names for unikernels launched without `--name`.

use super::AdmitError;
use crate::resources::{Name, Resources};

/// `base`, or the first of `base.2`, `base.3`, ... not running, at the root.
pub(super) fn unique_name(tree: &Resources, base: &str) -> Result<Name, AdmitError> {
    let label = sanitize_label(base);
    for i in 1u32.. {
        let candidate = if i == 1 {
            label.clone()
        } else {
            let suffix = format!(".{i}");
            let keep = label.len().min(63 - suffix.len());
            format!("{}{suffix}", &label[..keep])
        };
        let name: Name = candidate
            .parse()
            .map_err(|e| AdmitError::Invalid(format!("cannot name the unikernel: {e}")))?;
        if tree.find_unikernel(&name).is_none() && !taken_as_path(tree, &name) {
            return Ok(name);
        }
    }
    unreachable!("u32 suffixes run out")
}

/// Is `name` a path with a policy or with something below it?
pub(super) fn taken_as_path(tree: &Resources, name: &Name) -> bool {
    let p = name.to_path();
    tree.iter_policies().any(|(q, _)| p.is_prefix_of(&q))
        || tree
            .iter_unikernels()
            .any(|(n, _)| p.is_prefix_of(n.path()))
}

/// A file name made into a label: letters, digits, '-' and '.', at most
/// 63 characters.
pub(super) fn sanitize_label(s: &str) -> String {
    let mut l: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if l.is_empty() {
        l.push_str("unikernel");
    }
    l
}
