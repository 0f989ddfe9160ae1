//! The mirror: a bare repository that holds the fetched ref and everything it needs.
//!
//! A fetch connects once, lists the remote's refs, and downloads only when the configured ref
//! points at a commit the mirror does not have, with a refspec for that one ref, so an
//! unchanged remote costs one ref listing. The fetched commit is recorded under `refs/fwd/`
//! (`refs/fwd/heads/main`, `refs/fwd/tags/v1`), peeled: an annotated tag is followed to its
//! commit. The ref is written by this module, not by libgit2's tip update, so nothing else in
//! the mirror (FETCH_HEAD, auto-followed tags) changes.
//!
//! Each fetch reopens the mirror (a fresh view of the object database) and checks it first:
//! the folders exist, HEAD and the tracking ref parse, and every object of the policy folder of
//! the last fetched commit is present. A mirror that fails the check, or that fails while
//! storing a download, is rebuilt in `mirror.git.new` and renamed over the old one only after
//! the rebuild fetched the ref. Failures that come from the remote leave the mirror alone.
//!
//! The mirror's config records the URL without credentials (`fwd.url`); credentials stay in
//! memory. A mirror recorded for another URL is replaced at open.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Once;
use std::time::{Duration, Instant};

use git2::{
    AutotagOption, Cred, CredentialType, Direction, ErrorClass, ErrorCode, FetchOptions, Oid,
    RemoteCallbacks, Repository,
};

use super::error::GitDetail;
use super::location::Location;
use super::tree::Reader;
use super::{Fetched, Source, SourceError};

/// libgit2's socket timeouts, for http(s), git:// and ssh alike. The whole fetch is bounded
/// separately by the source's fetch timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Each fetch that moved the ref adds a pack, and libgit2 has no gc: past this many packs the
/// mirror's objects are merged into one (see [`compact`]).
pub(crate) const MAX_PACKS: usize = 32;

/// How long [`lock`] waits for the state folder's lock before it reports it in use.
const LOCK_WAIT: Duration = Duration::from_millis(500);

/// The mirror's config key holding the URL it mirrors, without credentials.
const URL_KEY: &str = "fwd.url";

/// Sets libgit2's process-wide options once.
pub(crate) fn init_libgit2() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ms = |d: Duration| i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: libgit2's global options are plain variables that must not be written while
        // another thread uses libgit2. `Once` makes this the only write, and it happens before
        // this process's first source exists; the timeouts are all the daemon changes.
        unsafe {
            // A failure leaves libgit2's default (no timeout); the fetch timeout still applies.
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(ms(CONNECT_TIMEOUT));
            let _ = git2::opts::set_server_timeout_in_milliseconds(ms(READ_TIMEOUT));
        }
    });
}

/// Where the mirror records a remote ref: `refs/heads/main` -> `refs/fwd/heads/main`.
pub(crate) fn tracking_ref(remote_name: &str) -> String {
    match remote_name.strip_prefix("refs/") {
        Some(rest) => format!("refs/fwd/{rest}"),
        None => format!("refs/fwd/{remote_name}"),
    }
}

/// `mirror.git` -> `mirror.git.<suffix>`, beside it.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

fn io_err(
    location: &Location,
    dir: &Path,
    action: &'static str,
) -> impl Fn(std::io::Error) -> SourceError {
    let url = location.display().to_owned();
    let dir = dir.to_owned();
    move |source| SourceError::Io { url: url.clone(), dir: dir.clone(), action, source }
}

/// Removes a folder (or whatever is in its place) if there is one.
fn remove_if_present(location: &Location, dir: &Path) -> Result<(), SourceError> {
    let removed = match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(dir),
        Ok(_) => std::fs::remove_file(dir),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_err(location, dir, "remove")(e))
        }
        _ => Ok(()),
    }
}

/// Takes the exclusive lock on the state folder (`mirror.lock`); released when the file closes.
pub(crate) fn lock(location: &Location, state_dir: &Path) -> Result<std::fs::File, SourceError> {
    std::fs::create_dir_all(state_dir).map_err(io_err(
        location,
        state_dir,
        "create the state folder",
    ))?;
    let path = state_dir.join("mirror.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(location, &path, "open the lock"))?;
    // A holder that is going away gets a moment: a daemon restarted while the old one exits,
    // or a process forked by another thread of this one that has not yet run exec (it shares
    // the lock until then).
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SourceError::Locked {
                    url: location.display().to_owned(),
                    dir: state_dir.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(location, &path, "lock")(e)),
        }
    }
}

/// Opens the mirror at `dir`, or creates an empty one when it is absent, unusable, or records
/// another URL.
pub(crate) fn open_or_create(
    location: &Location,
    dir: &Path,
    state_dir: &Path,
) -> Result<Repository, SourceError> {
    std::fs::create_dir_all(state_dir).map_err(io_err(
        location,
        state_dir,
        "create the state folder",
    ))?;
    // Left over from a rebuild that was interrupted.
    remove_if_present(location, &sibling(dir, "new"))?;
    remove_if_present(location, &sibling(dir, "old"))?;
    if dir.exists() {
        match open_existing(location, dir) {
            Ok(repo) => return Ok(repo),
            Err(reason) => {
                tracing::warn!(
                    url = location.display(),
                    mirror = %dir.display(),
                    %reason,
                    "mirror unusable; starting a new one"
                );
                remove_if_present(location, dir)?;
            }
        }
    }
    create(location, dir)
}

fn open_existing(location: &Location, dir: &Path) -> Result<Repository, String> {
    let repo = Repository::open_bare(dir).map_err(|e| e.message().to_owned())?;
    check_basics(&repo, dir).map_err(|e| e.message().to_owned())?;
    let recorded = repo.config().and_then(|c| c.get_string(URL_KEY)).ok();
    if recorded.as_deref() != Some(location.display()) {
        return Err(format!("it mirrors {}", recorded.as_deref().unwrap_or("an unrecorded URL")));
    }
    Ok(repo)
}

fn create(location: &Location, dir: &Path) -> Result<Repository, SourceError> {
    let mirror_err = |action| {
        move |e: git2::Error| SourceError::Mirror {
            url: location.display().to_owned(),
            dir: dir.to_owned(),
            action,
            source: GitDetail::new(&e, |m| location.redact(m)),
        }
    };
    let repo = Repository::init_bare(dir).map_err(mirror_err("create"))?;
    repo.config()
        .and_then(|mut c| c.set_str(URL_KEY, location.display()))
        .map_err(mirror_err("record the URL"))?;
    Ok(repo)
}

/// The folders exist and HEAD parses (an unborn HEAD is fine: the mirror has no branches).
fn check_basics(repo: &Repository, dir: &Path) -> Result<(), git2::Error> {
    for sub in ["objects", "refs"] {
        if !dir.join(sub).is_dir() {
            return Err(git2::Error::new(
                ErrorCode::NotFound,
                ErrorClass::Repository,
                format!("the mirror has no {sub} folder"),
            ));
        }
    }
    match repo.head() {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.code(), ErrorCode::UnbornBranch | ErrorCode::NotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The full check before a fetch: basics, the tracking refs parse and point at commits whose
/// policy folder is entirely present.
fn check(source: &Source, repo: &Repository) -> Result<(), git2::Error> {
    check_basics(repo, &source.dir)?;
    for name in &source.candidates {
        let reference = match repo.find_reference(&tracking_ref(name)) {
            Ok(r) => r,
            Err(e) if e.code() == ErrorCode::NotFound => continue,
            Err(e) => return Err(e),
        };
        let commit = reference.peel_to_commit()?;
        Reader { repo, url: source.location.display(), base: &source.base, limits: &source.limits }
            .check_present(commit.id())?;
    }
    Ok(())
}

/// Why fetching into a mirror failed: the remote (leave the mirror alone) or the mirror itself
/// (rebuild it).
enum Failure {
    Remote(SourceError),
    Mirror(&'static str, git2::Error),
}

pub(crate) fn fetch(source: &mut Source) -> Result<Fetched, SourceError> {
    let opened = Repository::open_bare(&source.dir).and_then(|repo| {
        check(source, &repo)?;
        Ok(repo)
    });
    let repo = match opened {
        Ok(repo) => repo,
        Err(e) => {
            tracing::warn!(
                url = source.location.display(),
                mirror = %source.dir.display(),
                reason = %source.location.redact(e.message()),
                "mirror damaged; rebuilding it"
            );
            return rebuild(source);
        }
    };
    match fetch_into(source, &repo) {
        Ok(new) => {
            if let Err(e) = compact(&repo, &source.dir) {
                tracing::warn!(
                    url = source.location.display(),
                    mirror = %source.dir.display(),
                    reason = %e.message(),
                    "compacting the mirror failed; it stays as it is"
                );
            }
            source.repo = repo;
            Ok(finish(source, new, false))
        }
        Err(Failure::Remote(e)) => Err(e),
        Err(Failure::Mirror(action, e)) => {
            tracing::warn!(
                url = source.location.display(),
                mirror = %source.dir.display(),
                action,
                reason = %source.location.redact(e.message()),
                "storing the fetch in the mirror failed; rebuilding it"
            );
            rebuild(source)
        }
    }
}

/// Fetches into a new mirror beside the old one and swaps them once it holds the ref.
fn rebuild(source: &mut Source) -> Result<Fetched, SourceError> {
    let location = source.location.clone();
    let dir = source.dir.clone();
    let new_dir = sibling(&dir, "new");
    let old_dir = sibling(&dir, "old");
    remove_if_present(&location, &new_dir)?;
    let new_repo = create(&location, &new_dir)?;
    let fetched = fetch_into(source, &new_repo);
    drop(new_repo);
    let new = match fetched {
        Ok(new) => new,
        Err(failure) => {
            remove_if_present(&location, &new_dir)?;
            return Err(match failure {
                Failure::Remote(e) => e,
                Failure::Mirror(action, e) => SourceError::Mirror {
                    url: location.display().to_owned(),
                    dir: new_dir,
                    action,
                    source: GitDetail::new(&e, |m| location.redact(m)),
                },
            });
        }
    };
    remove_if_present(&location, &old_dir)?;
    if dir.exists() {
        std::fs::rename(&dir, &old_dir).map_err(io_err(
            &location,
            &dir,
            "move the damaged mirror aside",
        ))?;
    }
    std::fs::rename(&new_dir, &dir).map_err(io_err(
        &location,
        &dir,
        "put the rebuilt mirror in place",
    ))?;
    remove_if_present(&location, &old_dir)?;
    source.repo = Repository::open_bare(&dir).map_err(|e| SourceError::Mirror {
        url: location.display().to_owned(),
        dir: dir.clone(),
        action: "open the rebuilt mirror",
        source: GitDetail::new(&e, |m| location.redact(m)),
    })?;
    Ok(finish(source, new, true))
}

fn finish(source: &mut Source, new: Oid, recloned: bool) -> Fetched {
    let previous = source.last;
    let forced = previous.is_some_and(|old| {
        old != new && !source.repo.graph_descendant_of(new, old).unwrap_or(false)
    });
    source.last = Some(new);
    Fetched { commit: new.to_string(), previous: previous.map(|p| p.to_string()), forced, recloned }
}

/// Merges the mirror's packs into one when there are more than [`MAX_PACKS`], keeping every
/// object (also commits a force-push left behind: the daemon may still hold one as applied).
/// A crash half-way leaves objects in two packs, which is harmless.
fn compact(repo: &Repository, dir: &Path) -> Result<(), git2::Error> {
    let pack_dir = dir.join("objects").join("pack");
    let packs: Vec<PathBuf> = std::fs::read_dir(&pack_dir)
        .map_err(|e| git2::Error::from_str(&format!("listing the packs: {e}")))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "pack"))
        .collect();
    if packs.len() <= MAX_PACKS {
        return Ok(());
    }
    let odb = repo.odb()?;
    let mut ids = Vec::new();
    odb.foreach(|id| {
        ids.push(*id);
        true
    })?;
    let mut builder = repo.packbuilder()?;
    builder.set_threads(1);
    for id in ids {
        builder.insert_object(id, None)?;
    }
    builder.write(&pack_dir, 0)?;
    let kept = format!("pack-{}.pack", builder.name()?.unwrap_or_default());
    for pack in packs {
        if pack.file_name().is_some_and(|name| name == kept.as_str()) {
            continue;
        }
        for ext in ["idx", "rev", "pack"] {
            // Index first and pack last: a pack without its index is ignored by readers.
            match std::fs::remove_file(pack.with_extension(ext)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(git2::Error::from_str(&format!("removing an old pack: {e}")));
                }
                _ => {}
            }
        }
    }
    odb.refresh()
}

/// Lists the remote, downloads the ref when the mirror lacks its commit, and records it.
fn fetch_into(source: &Source, repo: &Repository) -> Result<Oid, Failure> {
    let location = &source.location;
    let url = location.display();
    let reference = source.reference.as_str();
    let deadline = Instant::now() + source.fetch_timeout;
    let timed_out = Rc::new(Cell::new(false));
    let remote_err = |e: &git2::Error| {
        let detail = GitDetail::new(e, |m| location.redact(m));
        let url = url.to_owned();
        Failure::Remote(if timed_out.get() {
            SourceError::Timeout {
                url,
                reference: reference.to_owned(),
                timeout: source.fetch_timeout,
            }
        } else {
            match e.code() {
                ErrorCode::Auth => SourceError::Auth { url, source: detail },
                ErrorCode::Certificate => SourceError::Certificate { url, source: detail },
                ErrorCode::Owner => SourceError::Owner { url, source: detail },
                _ => SourceError::Unreachable {
                    url,
                    reference: reference.to_owned(),
                    source: detail,
                },
            }
        })
    };

    if let Some(path) = location.local() {
        // libgit2 reads a missing local path as an unknown URL scheme; say what is wrong.
        if let Err(e) = std::fs::metadata(path) {
            let message = format!("no repository at {}: {e}", path.display());
            return Err(remote_err(&git2::Error::new(
                ErrorCode::NotFound,
                ErrorClass::Os,
                message,
            )));
        }
    }
    let mut remote = repo.remote_anonymous(location.raw()).map_err(|e| remote_err(&e))?;
    let mut connection = remote
        .connect_auth(Direction::Fetch, Some(callbacks(deadline, &timed_out)), None)
        .map_err(|e| remote_err(&e))?;
    let heads: Vec<(String, Oid)> = connection
        .list()
        .map_err(|e| remote_err(&e))?
        .iter()
        .map(|h| (h.name().to_owned(), h.oid()))
        .collect();
    let advertised = |name: &str| heads.iter().find(|(n, _)| n == name).map(|(_, oid)| *oid);

    let Some((name, oid)) =
        source.candidates.iter().find_map(|c| advertised(c).map(|oid| (c.as_str(), oid)))
    else {
        let url = url.to_owned();
        let reference = reference.to_owned();
        return Err(Failure::Remote(match source.last {
            Some(last) => SourceError::RefDeleted { url, reference, last: last.to_string() },
            None => SourceError::RefNotFound { url, reference },
        }));
    };
    let tracking = tracking_ref(name);
    let want = advertised(&format!("{name}^{{}}")).unwrap_or(oid);
    // Up to date when the mirror's ref already holds what `want` peels to (for a tag without
    // an advertised peeled entry, `want` is the tag object, which the mirror then holds too).
    let have = repo.refname_to_id(&tracking).ok();
    let up_to_date = have.is_some_and(|have| {
        repo.find_object(want, None).and_then(|o| o.peel_to_commit()).is_ok_and(|c| c.id() == have)
    });
    if !up_to_date {
        let mut options = FetchOptions::new();
        options
            .remote_callbacks(callbacks(deadline, &timed_out))
            .download_tags(AutotagOption::None)
            .update_fetchhead(false);
        let refspec = format!("+{name}:{tracking}");
        if let Err(e) = connection.remote().download(&[refspec.as_str()], Some(&mut options)) {
            return Err(match e.class() {
                ErrorClass::Odb | ErrorClass::Repository | ErrorClass::Reference
                    if !timed_out.get() =>
                {
                    Failure::Mirror("store the download", e)
                }
                _ => remote_err(&e),
            });
        }
    }
    drop(connection);

    let object = repo
        .find_object(oid, None)
        .or_else(|_| repo.find_object(want, None))
        .map_err(|e| Failure::Mirror("read the fetched object", e))?;
    let commit = object.peel_to_commit().map_err(|_| {
        let kind = object.peel(git2::ObjectType::Any).ok().and_then(|o| o.kind());
        Failure::Remote(SourceError::NotACommit {
            url: url.to_owned(),
            reference: reference.to_owned(),
            kind: kind.map_or_else(|| "non-commit object".to_owned(), |k| k.str().to_owned()),
        })
    })?;
    repo.reference(&tracking, commit.id(), true, "fwd: fetch")
        .map_err(|e| Failure::Mirror("record the fetched commit", e))?;
    Ok(commit.id())
}

/// Callbacks for one connection: credentials, and the fetch deadline (a progress callback that
/// returns false makes libgit2 stop).
fn callbacks<'a>(deadline: Instant, timed_out: &Rc<Cell<bool>>) -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let mut credentials = Credentials::default();
    callbacks.credentials(move |url, user, allowed| credentials.next(url, user, allowed));
    let flag = Rc::clone(timed_out);
    callbacks.transfer_progress(move |_| {
        let on_time = Instant::now() < deadline;
        flag.set(!on_time);
        on_time
    });
    let flag = Rc::clone(timed_out);
    callbacks.sideband_progress(move |_| {
        let on_time = Instant::now() < deadline;
        flag.set(!on_time);
        on_time
    });
    callbacks
}

/// The credentials tried, each once, in order. For https, libgit2 itself first presents a
/// user and password written in the URL; then git's credential helpers. For ssh: the ssh
/// agent, then the user's default keys (`~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`). The host
/// key is checked against `~/.ssh/known_hosts` by libgit2.
#[derive(Default)]
struct Credentials {
    tried_agent: bool,
    tried_keys: usize,
    tried_helper: bool,
    tried_default: bool,
}

impl Credentials {
    fn next(
        &mut self,
        url: &str,
        user: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        let login = user.unwrap_or("git");
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(login);
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            if !self.tried_agent {
                self.tried_agent = true;
                if std::env::var_os("SSH_AUTH_SOCK").is_some() {
                    return Cred::ssh_key_from_agent(login);
                }
            }
            let home = std::env::var_os("HOME").map(PathBuf::from);
            let keys = ["id_ed25519", "id_ecdsa", "id_rsa"];
            while let Some(key) = keys.get(self.tried_keys) {
                self.tried_keys += 1;
                let Some(path) = home.as_ref().map(|h| h.join(".ssh").join(key)) else { break };
                if path.is_file() {
                    return Cred::ssh_key(login, None, &path, None);
                }
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) && !self.tried_helper {
            self.tried_helper = true;
            if let Ok(cred) = git2::Config::open_default()
                .and_then(|config| Cred::credential_helper(&config, url, user))
            {
                return Ok(cred);
            }
        }
        if allowed.contains(CredentialType::DEFAULT) && !self.tried_default {
            self.tried_default = true;
            return Cred::default();
        }
        Err(git2::Error::new(ErrorCode::Auth, ErrorClass::Net, "no more credentials to try"))
    }
}
