//! Rule lists as the flags give them: entries, or `@FILE` (one entry a line, the flag's
//! syntax, `#` comments), read at start and again on SIGHUP. A reload replaces each list
//! whose files all read well; a list with a bad file stays as it was.

use std::{
    fs,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use ipnet::IpNet;

use crate::{
    cidr,
    rules::{
        Lists,
        targets::{AddrSpec, AllowPair, AllowService, Origin},
    },
};

/// What a list flag takes: its syntax, as text.
pub trait ListEntry: Sized {
    fn parse_entry(text: &str) -> Result<Self, String>;
}

impl ListEntry for IpNet {
    fn parse_entry(text: &str) -> Result<Self, String> {
        cidr::parse(text)
    }
}

macro_rules! entry_from_str {
    ($($t:ty),*) => {$(
        impl ListEntry for $t {
            fn parse_entry(text: &str) -> Result<Self, String> {
                text.parse()
            }
        }
    )*};
}
entry_from_str!(AddrSpec, AllowService, AllowPair);

/// One value of a list flag: an entry, or `@FILE` of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item<T> {
    Entry(T),
    File(PathBuf),
}

impl<T: ListEntry> FromStr for Item<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix('@') {
            Some("") => Err("expected a file name after @".into()),
            Some(path) => Ok(Item::File(path.into())),
            None => T::parse_entry(s).map(Item::Entry),
        }
    }
}

/// A list file that cannot be used: the flag, the file and, for a bad entry, its line.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("invalid value '@{}' for '{flag}': {}: {err}", path.display(), path.display())]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("invalid value '@{}' for '{flag}': {}:{line}: '{text}': {why}", path.display(), path.display())]
    BadLine {
        flag: &'static str,
        path: PathBuf,
        line: usize,
        text: String,
        why: String,
    },
}

/// The entries of `path`, each with its line.
fn read_file<T: ListEntry>(
    flag: &'static str,
    path: &Path,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<Vec<(T, Origin)>, ListError> {
    let text = fs::read_to_string(path).map_err(|err| ListError::Unreadable {
        flag,
        path: path.to_owned(),
        err,
    })?;
    let list: Arc<str> = path.display().to_string().into();
    let mut entries = Vec::new();
    for (at, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let parsed = T::parse_entry(entry).and_then(|value| check(&value).map(|()| value));
        let value = parsed.map_err(|why| ListError::BadLine {
            flag,
            path: path.to_owned(),
            line: at + 1,
            text: entry.to_owned(),
            why,
        })?;
        let origin = Origin {
            list: Arc::clone(&list),
            line: at + 1,
        };
        entries.push((value, origin));
    }
    Ok(entries)
}

/// Every entry `items` give, in order, each with where it was given. `check` applies to
/// file lines: the command line's entries are checked with the other flags.
fn entries<T: ListEntry + Clone>(
    flag: &'static str,
    items: &[Item<T>],
    check: impl Fn(&T) -> Result<(), String> + Copy,
) -> Result<Vec<(T, Origin)>, ListError> {
    let mut entries = Vec::new();
    let mut given = 0;
    for item in items {
        match item {
            Item::Entry(value) => {
                given += 1;
                let origin = Origin {
                    list: flag.into(),
                    line: given,
                };
                entries.push((value.clone(), origin));
            }
            Item::File(path) => entries.extend(read_file(flag, path, check)?),
        }
    }
    Ok(entries)
}

/// Replaces `list` by what `items` give, or records why it stays as it was.
fn replace<T: ListEntry + Clone, U>(
    flag: &'static str,
    items: &[Item<T>],
    check: impl Fn(&T) -> Result<(), String> + Copy,
    list: &mut Vec<U>,
    errors: &mut Vec<ListError>,
    entry: impl Fn((T, Origin)) -> U,
) {
    match entries(flag, items, check) {
        Ok(entries) => *list = entries.into_iter().map(entry).collect(),
        Err(err) => errors.push(err),
    }
}

/// Any entry of the flag's syntax.
fn any<T>(_: &T) -> Result<(), String> {
    Ok(())
}

/// An entry without where it was given.
fn value<T>((value, _): (T, Origin)) -> T {
    value
}

/// Why a restricted net is refused: restricted hosts are local hosts.
pub const RESTRICTED_NOT_LOCAL: &str =
    "not inside any --local-net (restricted hosts are local hosts; add --local-net for it)";

/// The list flags as given, to read the lists from (again).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub long_ignore: Vec<Item<IpNet>>,
    pub restricted_nets: Vec<Item<IpNet>>,
    pub allow_dst: Vec<Item<AddrSpec>>,
    pub allow_service: Vec<Item<AllowService>>,
    pub allow_pair: Vec<Item<AllowPair>>,
    pub exclude_dst: Vec<Item<AddrSpec>>,
    pub intel_dst: Vec<Item<AddrSpec>>,
    /// `--local-net`: every restricted net must be inside one.
    pub local_nets: Vec<IpNet>,
}

impl Sources {
    /// Every list, or the first reason one cannot be read.
    pub fn load(&self) -> Result<Lists, ListError> {
        let mut lists = Lists::default();
        match self.reload(&mut lists).into_iter().next() {
            Some(err) => Err(err),
            None => Ok(lists),
        }
    }

    /// Reads every list again into `lists`; a list that cannot be read keeps its old
    /// entries, and why is returned.
    pub fn reload(&self, lists: &mut Lists) -> Vec<ListError> {
        let mut errors = Vec::new();
        let local = |net: &IpNet| {
            let inside = self.local_nets.iter().any(|local| local.contains(net));
            inside
                .then_some(())
                .ok_or_else(|| RESTRICTED_NOT_LOCAL.to_owned())
        };
        let errs = &mut errors;
        replace(
            "--long-ignore",
            &self.long_ignore,
            any,
            &mut lists.long_ignore,
            errs,
            value,
        );
        replace(
            "--restricted-net",
            &self.restricted_nets,
            local,
            &mut lists.restricted_nets,
            errs,
            value,
        );
        let allowed = &mut lists.allowed;
        replace(
            "--allow-dst",
            &self.allow_dst,
            any,
            &mut allowed.dst,
            errs,
            value,
        );
        replace(
            "--allow-service",
            &self.allow_service,
            any,
            &mut allowed.services,
            errs,
            value,
        );
        replace(
            "--allow-pair",
            &self.allow_pair,
            any,
            &mut allowed.pairs,
            errs,
            value,
        );
        replace(
            "--exclude-dst",
            &self.exclude_dst,
            any,
            &mut lists.exclude_dst,
            errs,
            value,
        );
        replace(
            "--intel-dst",
            &self.intel_dst,
            any,
            &mut lists.intel,
            errs,
            |entry| entry,
        );
        errors
    }
}

/// Bumped on SIGHUP: the pipeline reloads the lists before its next poll.
static RELOADS: AtomicU64 = AtomicU64::new(0);

/// Asks for the lists to be read again.
pub fn request_reload() {
    RELOADS.fetch_add(1, Ordering::Relaxed);
}

/// Which reload requests were answered.
#[derive(Default)]
pub struct Reloads(u64);

impl Reloads {
    /// Whether a reload was asked for since the last call.
    pub fn requested(&mut self) -> bool {
        let now = RELOADS.load(Ordering::Relaxed);
        std::mem::replace(&mut self.0, now) != now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file under the test's own directory holding `text`.
    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("monitor-lists-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn item<T: ListEntry>(text: &str) -> Item<T> {
        text.parse().unwrap()
    }

    #[test]
    fn files_take_an_entry_a_line_with_comments_and_blank_lines() {
        let path = file(
            "intel.txt",
            "# feed of 2026-12-07\n\n203.0.113.0/24\n  evil.example.test  # C2\n*.bad.test\n",
        );
        let sources = Sources {
            intel_dst: vec![
                item("192.0.2.1"),
                Item::File(path.clone()),
                item("192.0.2.2"),
            ],
            ..Sources::default()
        };
        let lists = sources.load().unwrap();
        let got: Vec<_> = (lists.intel.iter())
            .map(|(spec, o)| (spec.to_string(), o.list.to_string(), o.line))
            .collect();
        let file = path.display().to_string();
        assert_eq!(
            got,
            [
                ("192.0.2.1/32".into(), "--intel-dst".into(), 1),
                ("203.0.113.0/24".into(), file.clone(), 3),
                ("evil.example.test".into(), file.clone(), 4),
                ("*.bad.test".into(), file, 5),
                ("192.0.2.2/32".into(), "--intel-dst".into(), 2),
            ]
        );
        assert_eq!(
            "@".parse::<Item<IpNet>>(),
            Err("expected a file name after @".into())
        );
    }

    #[test]
    fn a_bad_line_is_named_by_flag_file_and_line() {
        let path = file("allow.txt", "192.0.2.0/24\nbad_name!\n");
        let sources = Sources {
            allow_dst: vec![Item::File(path.clone())],
            ..Sources::default()
        };
        let err = sources.load().unwrap_err().to_string();
        let shown = path.display();
        assert_eq!(
            err,
            format!(
                "invalid value '@{shown}' for '--allow-dst': {shown}:2: 'bad_name!': expected an IP \
                 address, a network such as 203.0.113.0/24, a host name or *.domain"
            )
        );
        let missing = Sources {
            long_ignore: vec![Item::File("/nonexistent/ignore.txt".into())],
            ..Sources::default()
        };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.starts_with("invalid value '@/nonexistent/ignore.txt' for '--long-ignore': /nonexistent/ignore.txt: "), "{err}");
    }

    #[test]
    fn restricted_nets_in_files_must_be_local() {
        let path = file("restricted.txt", "198.18.5.0/24\n203.0.113.0/24\n");
        let sources = Sources {
            restricted_nets: vec![Item::File(path)],
            local_nets: vec!["198.18.0.0/15".parse().unwrap()],
            ..Sources::default()
        };
        let err = sources.load().unwrap_err().to_string();
        assert!(
            err.contains(":2: '203.0.113.0/24': not inside any --local-net"),
            "{err}"
        );
    }

    /// A reload replaces the lists that read well and keeps the others as they were.
    #[test]
    fn a_bad_file_keeps_its_old_list_and_the_others_reload() {
        let allow = file("reload-allow.txt", "192.0.2.0/24\n");
        let exclude = file("reload-exclude.txt", "198.51.100.0/24\n");
        let sources = Sources {
            allow_dst: vec![Item::File(allow.clone())],
            exclude_dst: vec![Item::File(exclude.clone())],
            ..Sources::default()
        };
        let mut lists = sources.load().unwrap();
        fs::write(&allow, "192.0.2.0/24\n203.0.113.9\n").unwrap();
        fs::write(&exclude, "198.51.100.0/24\n300.1.1.1\n").unwrap();
        let errors = sources.reload(&mut lists);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().contains(":2: '300.1.1.1'"),
            "{}",
            errors[0]
        );
        assert_eq!(lists.allowed.dst.len(), 2, "the good file reloaded");
        assert_eq!(lists.exclude_dst, vec!["198.51.100.0/24".parse().unwrap()]);
    }

    #[test]
    fn a_reload_is_seen_once() {
        let mut reloads = Reloads::default();
        reloads.requested();
        request_reload();
        assert!(reloads.requested());
        assert!(!reloads.requested());
    }
}
