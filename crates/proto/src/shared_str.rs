//! An immutable string shared by reference count: a message's `sender`.
//!
//! The broker stamps every message it accepts with the sending service's
//! name. As a `String`, that was an allocation and a copy per message (and
//! a free per message once delivered), ~6 % of the broker's time at a
//! million small messages a second. Shared, it is a reference count taken
//! on the connection's one copy. The empty string — what a client sends,
//! and what `Message::new` starts with — holds no allocation at all, so it
//! costs nothing to make or drop, on any thread.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// An immutable, cheaply cloned string; reads as a `&str`.
///
/// ```
/// use courier_proto::SharedStr;
/// let web = SharedStr::from("web");
/// let copy = web.clone(); // a reference count, not a copy
/// assert_eq!(copy, "web");
/// assert_eq!(copy.len(), 3);
/// assert_eq!(SharedStr::default(), "");
/// ```
#[derive(Clone, Default)]
pub struct SharedStr(Option<Arc<str>>);

impl SharedStr {
    /// The empty string (no allocation).
    pub const fn new() -> SharedStr {
        SharedStr(None)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl Deref for SharedStr {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for SharedStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for SharedStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for SharedStr {
    fn from(text: &str) -> SharedStr {
        if text.is_empty() {
            SharedStr(None)
        } else {
            SharedStr(Some(Arc::from(text)))
        }
    }
}

impl From<String> for SharedStr {
    fn from(text: String) -> SharedStr {
        SharedStr::from(text.as_str())
    }
}

impl From<&String> for SharedStr {
    fn from(text: &String) -> SharedStr {
        SharedStr::from(text.as_str())
    }
}

impl From<SharedStr> for String {
    fn from(text: SharedStr) -> String {
        text.as_str().to_owned()
    }
}

// Equality, order and hash are the text's, so a `SharedStr` and a `&str`
// with the same text are interchangeable as keys (`Borrow<str>`).
impl PartialEq for SharedStr {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SharedStr {}

impl PartialOrd for SharedStr {
    fn partial_cmp(&self, other: &SharedStr) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SharedStr {
    fn cmp(&self, other: &SharedStr) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for SharedStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq<str> for SharedStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for SharedStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for SharedStr {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<SharedStr> for str {
    fn eq(&self, other: &SharedStr) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<SharedStr> for &str {
    fn eq(&self, other: &SharedStr) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<SharedStr> for String {
    fn eq(&self, other: &SharedStr) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::collections::HashSet;

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut h = DefaultHasher::new();
        value.hash(&mut h);
        h.finish()
    }

    #[test]
    fn the_empty_string_holds_nothing_however_it_is_made() {
        assert!(SharedStr::new().0.is_none());
        assert!(SharedStr::default().0.is_none());
        assert!(SharedStr::from("").0.is_none());
        assert!(SharedStr::from(String::new()).0.is_none());
        assert_eq!(SharedStr::new(), SharedStr::from(""));
        assert_eq!(SharedStr::new().as_str(), "");
    }

    #[test]
    fn clones_share_one_allocation() {
        let a = SharedStr::from("bench-transient-publisher");
        let b = a.clone();
        assert!(std::ptr::eq(a.as_str().as_ptr(), b.as_str().as_ptr()));
        assert_eq!(a, b);
    }

    #[test]
    fn compares_hashes_and_orders_as_its_text() {
        let web = SharedStr::from("web");
        assert_eq!(web, "web");
        assert_eq!("web", web);
        assert_eq!(web, String::from("web"));
        assert_ne!(web, "todo");
        assert_eq!(hash_of(&web), hash_of("web"));
        assert_eq!(hash_of(&SharedStr::new()), hash_of(""));
        let (empty, a, b) = (SharedStr::new(), SharedStr::from("a"), SharedStr::from("b"));
        assert!(a < b);
        assert!(empty < a);
        assert_eq!(a.cmp(&b), "a".cmp("b"));
        let set: HashSet<SharedStr> = ["web", "todo"].into_iter().map(SharedStr::from).collect();
        assert!(set.contains("web"));
        assert!(!set.contains("audit"));
        assert_eq!(format!("{web} {web:?}"), "web \"web\"");
        assert_eq!(String::from(web), "web");
    }
}
