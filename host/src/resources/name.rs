//! Labels, paths and unikernel names.
//!
//! A [`Label`] is 1 to [`MAX_LABEL_LEN`] ASCII letters, digits, `-` and `.`.
//! A [`Path`] is a sequence of at most [`MAX_DEPTH`] labels written joined by
//! `:` (`alice:bob`); the root path has no labels and is written `(root)`
//! (the parser also accepts `""` and `":"` for it). A [`Name`] is a path and
//! one final label: `alice:bob:web` is the unikernel `web` under `alice:bob`,
//! and `web` is the unikernel `web` at the root.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// The longest label, in characters.
pub const MAX_LABEL_LEN: usize = 63;

/// The most labels a [`Path`] may have (a [`Name`] has one more). It bounds
/// the depth of the resource tree, so walking it never runs out of stack.
pub const MAX_DEPTH: usize = 32;

use crate::text::quote;

/// What the text `Path`, `Name` and `Label` parsers refuse; each names the
/// offending label or position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Two `:` in a row, or a leading or trailing `:`.
    #[error(
        "empty label at position {position} in '{}' (labels are separated by single ':')",
        quote(.input)
    )]
    EmptyLabel {
        /// The whole text given.
        input: String,
        /// 1-based index of the empty label.
        position: usize,
    },
    /// A label longer than [`MAX_LABEL_LEN`].
    #[error(
        "label '{}' is {len} characters long, at most {MAX_LABEL_LEN} are allowed",
        quote(.label)
    )]
    LabelTooLong { label: String, len: usize },
    /// A label with a character other than a letter, digit, `-` or `.`.
    #[error(
        "label '{}' contains {ch:?}; only ASCII letters, digits, '-' and '.' are allowed",
        quote(.label)
    )]
    BadCharacter { label: String, ch: char },
    /// More than [`MAX_DEPTH`] labels in a path.
    #[error(
        "'{}' has {depth} path labels, at most {MAX_DEPTH} are allowed",
        quote(.input)
    )]
    TooDeep { input: String, depth: usize },
    /// A unikernel name must have at least its own label.
    #[error("a unikernel name needs at least one label, got '{}'", quote(.input))]
    EmptyName { input: String },
}

/// One component of a path or name: 1 to 63 ASCII letters, digits, `-`, `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label(String);

impl Label {
    /// Validate `s` as a label.
    pub fn new(s: &str) -> Result<Label, NameError> {
        if s.is_empty() {
            return Err(NameError::EmptyLabel {
                input: s.to_string(),
                position: 1,
            });
        }
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
        {
            return Err(NameError::BadCharacter {
                label: s.to_string(),
                ch,
            });
        }
        // All characters are ASCII now, so bytes == characters.
        if s.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong {
                label: s.to_string(),
                len: s.len(),
            });
        }
        Ok(Label(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Label {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Label {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Label, NameError> {
        Label::new(s)
    }
}

/// Split `s` on `:` into validated labels; `s` must not be empty.
fn parse_labels(s: &str) -> Result<Vec<Label>, NameError> {
    s.split(':')
        .enumerate()
        .map(|(i, l)| {
            if l.is_empty() {
                Err(NameError::EmptyLabel {
                    input: s.to_string(),
                    position: i + 1,
                })
            } else {
                Label::new(l)
            }
        })
        .collect()
}

/// A position in the delegation tree: a sequence of labels, root first.
///
/// Displayed joined by `:`; the root (no labels) is displayed `(root)`.
/// Ordered like its label sequence, so sorting paths lists every path just
/// before the paths below it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Path(Vec<Label>);

impl Path {
    /// The root path, which has no labels.
    pub fn root() -> Path {
        Path(Vec::new())
    }

    /// The path made of `labels`, root first; refused past [`MAX_DEPTH`].
    pub fn from_labels(labels: Vec<Label>) -> Result<Path, NameError> {
        if labels.len() > MAX_DEPTH {
            return Err(NameError::TooDeep {
                input: labels
                    .iter()
                    .map(Label::as_str)
                    .collect::<Vec<_>>()
                    .join(":"),
                depth: labels.len(),
            });
        }
        Ok(Path(labels))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn labels(&self) -> &[Label] {
        &self.0
    }

    /// Number of labels (0 for the root).
    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// The path one level up; `None` for the root.
    pub fn parent(&self) -> Option<Path> {
        let (_, init) = self.0.split_last()?;
        Some(Path(init.to_vec()))
    }

    /// This path with `label` appended; refused past [`MAX_DEPTH`].
    pub fn join(&self, label: Label) -> Result<Path, NameError> {
        let mut labels = self.0.clone();
        labels.push(label);
        Path::from_labels(labels)
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn is_prefix_of(&self, other: &Path) -> bool {
        other.0.starts_with(&self.0)
    }

    /// `labels` as a path, for labels taken from the tree (whose depth is
    /// bounded by construction).
    pub(super) fn from_tree(labels: Vec<Label>) -> Path {
        debug_assert!(labels.len() <= MAX_DEPTH);
        Path(labels)
    }

    /// The first `n` labels of `self` (`n <= depth()`).
    pub(super) fn prefix(&self, n: usize) -> Path {
        Path(self.0[..n].to_vec())
    }

    /// Every path from the root down to `self`, both included: `alice:bob`
    /// yields `(root)`, `alice`, `alice:bob`.
    pub fn ancestors(&self) -> impl DoubleEndedIterator<Item = Path> + '_ {
        (0..=self.0.len()).map(|n| self.prefix(n))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(root)");
        }
        for (i, l) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            f.write_str(l.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for Path {
    type Err = NameError;
    /// `""`, `":"` and `"(root)"` are the root; otherwise labels joined by `:`.
    fn from_str(s: &str) -> Result<Path, NameError> {
        if s.is_empty() || s == ":" || s == "(root)" {
            return Ok(Path::root());
        }
        let labels = parse_labels(s)?;
        if labels.len() > MAX_DEPTH {
            return Err(NameError::TooDeep {
                input: s.to_string(),
                depth: labels.len(),
            });
        }
        Ok(Path(labels))
    }
}

/// The full name of a unikernel: the path it runs under and its own label.
///
/// Ordered like the name read as a path ([`Name::to_path`]), so names sort
/// in the tree's order: `a:x` before `web`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name {
    path: Path,
    label: Label,
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        let mine = self.path.0.iter().chain(std::iter::once(&self.label));
        let theirs = other.path.0.iter().chain(std::iter::once(&other.label));
        mine.cmp(theirs)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Name {
    pub fn new(path: Path, label: Label) -> Name {
        Name { path, label }
    }

    /// The path the unikernel runs under (its policies are this path's
    /// [`Path::ancestors`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The unikernel's own label.
    pub fn label(&self) -> &Label {
        &self.label
    }

    /// The name read as a path (`alice:web` as a path): the position in the
    /// tree the unikernel occupies, which no policy may also occupy.
    pub fn to_path(&self) -> Path {
        let mut labels = self.path.0.clone();
        labels.push(self.label.clone());
        Path(labels)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_root() {
            write!(f, "{}", self.label)
        } else {
            write!(f, "{}:{}", self.path, self.label)
        }
    }
}

impl FromStr for Name {
    type Err = NameError;
    /// `web` is `web` at the root; `alice:bob:web` is `web` under `alice:bob`.
    fn from_str(s: &str) -> Result<Name, NameError> {
        if s.is_empty() || s == ":" {
            return Err(NameError::EmptyName {
                input: s.to_string(),
            });
        }
        let mut labels = parse_labels(s)?;
        if labels.len() > MAX_DEPTH + 1 {
            return Err(NameError::TooDeep {
                input: s.to_string(),
                depth: labels.len() - 1,
            });
        }
        let label = labels.pop().expect("split yields at least one label");
        Ok(Name {
            path: Path(labels),
            label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Path {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays_paths() {
        assert_eq!(path("").to_string(), "(root)");
        assert_eq!(path(":"), Path::root());
        assert_eq!(path("(root)"), Path::root());
        let p = path("alice:bob");
        assert_eq!(p.depth(), 2);
        assert_eq!(p.to_string(), "alice:bob");
        assert_eq!(path(&p.to_string()), p);
        assert_eq!(path("a-1.x").labels()[0].as_str(), "a-1.x");
    }

    #[test]
    fn ancestors_are_root_first_and_include_self() {
        let got: Vec<String> = path("a:b:c").ancestors().map(|p| p.to_string()).collect();
        assert_eq!(got, ["(root)", "a", "a:b", "a:b:c"]);
        assert_eq!(Path::root().ancestors().count(), 1);
        assert!(path("a").is_prefix_of(&path("a:b")));
        assert!(path("a").is_prefix_of(&path("a")));
        assert!(!path("a:b").is_prefix_of(&path("a")));
        assert!(!path("a").is_prefix_of(&path("ab")));
        assert_eq!(path("a:b").parent(), Some(path("a")));
        assert_eq!(Path::root().parent(), None);
    }

    #[test]
    fn parses_names() {
        let n: Name = "web".parse().unwrap();
        assert!(n.path().is_root());
        assert_eq!(n.label().as_str(), "web");
        assert_eq!(n.to_string(), "web");
        let n: Name = "alice:bob:web".parse().unwrap();
        assert_eq!(n.path(), &path("alice:bob"));
        assert_eq!(n.to_string(), "alice:bob:web");
        assert_eq!(n.to_path(), path("alice:bob:web"));
    }

    #[test]
    fn names_sort_like_their_paths() {
        let mut names: Vec<Name> = ["web", "a:x", "a", "a:b:c", "b:web"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        names.sort();
        let sorted: Vec<String> = names.iter().map(Name::to_string).collect();
        assert_eq!(sorted, ["a", "a:b:c", "a:x", "b:web", "web"]);
    }

    #[test]
    fn errors_name_the_bad_label() {
        let e = "alice::web".parse::<Name>().unwrap_err();
        assert_eq!(
            e,
            NameError::EmptyLabel {
                input: "alice::web".into(),
                position: 2
            }
        );
        assert_eq!(
            e.to_string(),
            "empty label at position 2 in 'alice::web' (labels are separated by single ':')"
        );
        let e = "alice:we b".parse::<Path>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "label 'we b' contains ' '; only ASCII letters, digits, '-' and '.' are allowed"
        );
        let long = "x".repeat(64);
        let e = format!("alice:{long}").parse::<Name>().unwrap_err();
        assert_eq!(
            e,
            NameError::LabelTooLong {
                label: long.clone(),
                len: 64
            }
        );
        assert!(e.to_string().contains("is 64 characters long, at most 63"));
        assert!(Label::new(&"x".repeat(63)).is_ok());
        assert!(matches!(
            "é".parse::<Name>(),
            Err(NameError::BadCharacter { ch: 'é', .. })
        ));
        assert!(matches!(
            "alice:".parse::<Path>(),
            Err(NameError::EmptyLabel { position: 2, .. })
        ));
        assert!(matches!(
            "".parse::<Name>(),
            Err(NameError::EmptyName { .. })
        ));
        assert!(matches!(
            ":".parse::<Name>(),
            Err(NameError::EmptyName { .. })
        ));
        assert!(matches!(
            "(root)".parse::<Name>(),
            Err(NameError::BadCharacter { ch: '(', .. })
        ));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = vec!["a"; MAX_DEPTH].join(":");
        assert_eq!(path(&deep).depth(), MAX_DEPTH);
        let name: Name = format!("{deep}:web").parse().unwrap();
        assert_eq!(name.path().depth(), MAX_DEPTH);
        let too_deep = format!("{deep}:a");
        assert!(matches!(
            too_deep.parse::<Path>(),
            Err(NameError::TooDeep { depth: 33, .. })
        ));
        assert!(matches!(
            format!("{too_deep}:web").parse::<Name>(),
            Err(NameError::TooDeep { depth: 33, .. })
        ));
        assert!(path(&deep).join(Label::new("b").unwrap()).is_err());
    }
}
