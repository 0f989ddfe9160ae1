//! Where a source lives: a local repository or a remote, and the URL as it may be shown.
//!
//! The URL from the configuration may carry credentials (`https://user:token@host/repo`). They
//! are needed to talk to the remote, so the original is kept for libgit2 alone; everything that
//! can reach a person (error messages, logs, the mirror's own config on disk) goes through
//! [`Location::display`], which has the user information removed, and libgit2's own messages go
//! through [`Location::redact`] in case they quote the URL back.

use std::path::{Path, PathBuf};

/// A parsed `source.url`.
#[derive(Clone)]
pub(crate) struct Location {
    /// What libgit2 is given: the configured URL, or for a plain path its absolute form.
    raw: String,
    /// The URL without user information.
    display: String,
    /// Secret substrings of `raw` (the user information) to scrub from messages.
    secrets: Vec<String>,
    /// The repository on this machine, for a plain path or a `file://` URL.
    local: Option<PathBuf>,
}

impl Location {
    /// Parses a configured URL. The error is a reason for the user, naming no credentials.
    pub(crate) fn parse(url: &str) -> Result<Location, String> {
        if url.is_empty() {
            return Err("the URL is empty".into());
        }
        if url.trim() != url || url.chars().any(char::is_control) {
            return Err("the URL has leading or trailing spaces or control characters".into());
        }
        if let Some((scheme, rest)) = url.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            let (authority, tail) = match rest.find('/') {
                Some(at) => rest.split_at(at),
                None => (rest, ""),
            };
            let (userinfo, host) = match authority.rfind('@') {
                Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
                None => (None, authority),
            };
            let display = format!("{scheme}://{host}{tail}");
            let secrets = secrets_of(userinfo);
            match scheme.as_str() {
                "file" => {
                    if userinfo.is_some() || !(host.is_empty() || host == "localhost") {
                        return Err("a file:// URL names no user or host other than localhost \
                                    (file:///path/to/repo)"
                            .into());
                    }
                    if tail.is_empty() {
                        return Err("the file:// URL has no path".into());
                    }
                    let path = PathBuf::from(percent_decode(tail)?);
                    Ok(Location { raw: url.to_owned(), display, secrets, local: Some(path) })
                }
                "https" | "http" | "ssh" | "git" | "ssh+git" | "git+ssh" => {
                    if host.is_empty() {
                        return Err(format!("the {scheme}:// URL has no host"));
                    }
                    Ok(Location { raw: url.to_owned(), display, secrets, local: None })
                }
                _ => Err(format!(
                    "unsupported URL scheme '{scheme}' (https://, ssh://, file:// or a local path)"
                )),
            }
        } else if is_scp_like(url) {
            // `git@host:org/repo.git`: ssh. The user name is not a secret (there is no password
            // in this form), so it is shown.
            Ok(Location {
                raw: url.to_owned(),
                display: url.to_owned(),
                secrets: Vec::new(),
                local: None,
            })
        } else {
            let path = std::path::absolute(Path::new(url))
                .map_err(|e| format!("cannot make the path absolute: {e}"))?;
            let raw =
                path.to_str().ok_or_else(|| "the path is not valid UTF-8".to_owned())?.to_owned();
            Ok(Location { display: raw.clone(), raw, secrets: Vec::new(), local: Some(path) })
        }
    }

    /// The URL as given to libgit2 (may hold credentials: never show it).
    pub(crate) fn raw(&self) -> &str {
        &self.raw
    }

    /// The URL without credentials, for messages and logs.
    pub(crate) fn display(&self) -> &str {
        &self.display
    }

    /// The repository's folder when it is on this machine.
    pub(crate) fn local(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    /// `message` with every occurrence of the URL's credentials removed.
    pub(crate) fn redact(&self, message: &str) -> String {
        let mut out = message.replace(&self.raw, &self.display);
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), "***");
        }
        out
    }
}

/// `url` without user information, also when it does not parse as a source URL (for messages
/// about a URL that is refused).
pub(crate) fn display_of(url: &str) -> String {
    match Location::parse(url) {
        Ok(location) => location.display,
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => {
                let authority_end = rest.find('/').unwrap_or(rest.len());
                let host_start = rest[..authority_end].rfind('@').map_or(0, |at| at + 1);
                format!("{scheme}://{}", &rest[host_start..])
            }
            None => url.to_owned(),
        },
    }
}

/// The parts of a URL's user information that must not be shown: the password (with the user
/// name before it), and a user name long enough to be a token rather than a login like `git`.
fn secrets_of(userinfo: Option<&str>) -> Vec<String> {
    let Some(userinfo) = userinfo.filter(|u| !u.is_empty()) else {
        return Vec::new();
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, password),
        None => (userinfo, ""),
    };
    let mut secrets = Vec::new();
    if !password.is_empty() {
        secrets.push(userinfo.to_owned());
        secrets.push(password.to_owned());
    }
    if user.len() >= 8 {
        secrets.push(user.to_owned());
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// `host:path` or `user@host:path` with no `/` before the colon, as git reads it: ssh.
fn is_scp_like(url: &str) -> bool {
    if url.starts_with('/') || url.starts_with('.') {
        return false;
    }
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon < slash && colon > 0,
        (Some(colon), None) => colon > 0,
        (None, _) => false,
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "the file:// URL has a malformed %-escape".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the file:// URL's path is not valid UTF-8".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_credentials_are_removed_from_the_display_and_messages() {
        let l =
            Location::parse("https://alice:s3cr3t-t0ken@git.example.com/org/policies.git").unwrap();
        assert_eq!(l.display(), "https://git.example.com/org/policies.git");
        assert!(l.local().is_none());
        let msg = l.redact(
            "failed to connect to https://alice:s3cr3t-t0ken@git.example.com/org/policies.git; \
             token s3cr3t-t0ken rejected",
        );
        assert!(!msg.contains("s3cr3t"), "{msg}");
        assert!(!msg.contains("alice"), "{msg}");
        assert!(msg.contains("https://git.example.com/org/policies.git"), "{msg}");
    }

    #[test]
    fn a_token_as_user_name_is_a_secret() {
        let l = Location::parse("https://ghp_abcdefghijkl@host/r.git").unwrap();
        assert_eq!(l.display(), "https://host/r.git");
        assert_eq!(l.redact("bad token ghp_abcdefghijkl"), "bad token ***");
    }

    #[test]
    fn ssh_and_scp_like_urls_are_remote() {
        let l = Location::parse("ssh://git@host:2222/org/repo.git").unwrap();
        assert_eq!(l.display(), "ssh://host:2222/org/repo.git");
        assert!(l.local().is_none());
        let l = Location::parse("git@host:org/repo.git").unwrap();
        assert_eq!(l.display(), "git@host:org/repo.git");
        assert!(l.local().is_none());
    }

    #[test]
    fn file_urls_and_paths_are_local() {
        let l = Location::parse("file:///srv/policies%20repo.git").unwrap();
        assert_eq!(l.local(), Some(Path::new("/srv/policies repo.git")));
        assert_eq!(l.raw(), "file:///srv/policies%20repo.git");
        let l = Location::parse("file://localhost/srv/p.git").unwrap();
        assert_eq!(l.local(), Some(Path::new("/srv/p.git")));
        let l = Location::parse("/srv/p").unwrap();
        assert_eq!(l.local(), Some(Path::new("/srv/p")));
        let l = Location::parse("./p").unwrap();
        assert!(l.local().unwrap().is_absolute());
    }

    #[test]
    fn a_refused_url_is_still_shown_without_credentials() {
        assert_eq!(display_of("ftp://user:pw@host/x"), "ftp://host/x");
        assert_eq!(display_of("https://t@host/x"), "https://host/x");
        assert_eq!(display_of("/srv/x"), "/srv/x");
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["", " /x", "ftp://host/x", "file://otherhost/x", "https:///x", "file://"] {
            assert!(Location::parse(url).is_err(), "{url:?} accepted");
        }
    }
}
