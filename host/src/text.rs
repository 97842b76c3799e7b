//! Reading numbers from users, and quoting what they typed back to them.

use std::borrow::Cow;
use std::str::FromStr;

/// Most characters of user input an error message quotes.
pub const QUOTE_MAX: usize = 100;

/// A decimal number as users write one: ASCII digits only (no sign, no
/// spaces: `"+5"` and `" 5"` are not numbers, though `str::parse`
/// accepts the first), in range for `T`.
pub fn number<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `s` for an error message: at most [`QUOTE_MAX`] characters, then how
/// many were left out.
pub fn quote(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(QUOTE_MAX) {
        None => Cow::Borrowed(s),
        Some((cut, _)) => {
            let more = s[cut..].chars().count();
            Cow::Owned(format!("{}... ({more} more characters)", &s[..cut]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_digits_only() {
        assert_eq!(number::<u64>("64"), Some(64));
        assert_eq!(number::<u64>("007"), Some(7));
        for bad in ["+64", "-1", " 64", "64 ", "", "6_4", "0x40", "１"] {
            assert_eq!(number::<u64>(bad), None, "{bad:?}");
        }
        assert_eq!(number::<u16>("65536"), None, "out of range");
    }

    #[test]
    fn long_input_is_cut_at_a_character_boundary() {
        assert_eq!(quote("short"), "short");
        let long = "é".repeat(250);
        let q = quote(&long);
        assert!(q.starts_with(&"é".repeat(100)), "{q}");
        assert!(q.ends_with("... (150 more characters)"), "{q}");
        assert!(q.chars().count() < 130);
    }
}
