//! The git source against real repositories in temporary folders: a bare repository as the
//! remote (by file:// URL and by plain path), a developer's checkout as a local source, and
//! the failures the daemon must survive (force-push, deleted branch, remote gone, damaged
//! mirror).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use fwd::source::{Fetched, Limits, Source, SourceError, SourceSpec};
use tempfile::TempDir;

/// Runs git in `dir` with a config of its own (no user or system config) and fixed identities.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Policy Author")
        .env("GIT_AUTHOR_EMAIL", "author@example.com")
        .env("GIT_COMMITTER_NAME", "Policy Author")
        .env("GIT_COMMITTER_EMAIL", "author@example.com")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A bare remote, a checkout that pushes to it, and a state folder for the mirror.
struct Lab {
    tmp: TempDir,
}

impl Lab {
    fn new() -> Lab {
        let lab = Lab { tmp: tempfile::tempdir().unwrap() };
        git(lab.tmp.path(), &["init", "-q", "--bare", "remote.git"]);
        git(lab.tmp.path(), &["init", "-q", "work"]);
        git(&lab.work(), &["remote", "add", "origin", lab.remote().to_str().unwrap()]);
        lab
    }

    fn remote(&self) -> PathBuf {
        self.tmp.path().join("remote.git")
    }

    fn work(&self) -> PathBuf {
        self.tmp.path().join("work")
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn mirror(&self) -> PathBuf {
        self.state().join("mirror.git")
    }

    fn file_url(&self) -> String {
        format!("file://{}", self.remote().display())
    }

    fn write(&self, path: &str, content: &str) {
        let path = self.work().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn remove(&self, path: &str) {
        git(&self.work(), &["rm", "-q", "-r", path]);
    }

    fn symlink(&self, path: &str, target: &str) {
        let path = self.work().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, path).unwrap();
    }

    /// Commits everything in the checkout; returns the commit id.
    fn commit(&self, message: &str) -> String {
        git(&self.work(), &["add", "-A"]);
        git(&self.work(), &["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.work(), &["rev-parse", "HEAD"])
    }

    fn push(&self, refspec: &str) {
        git(&self.work(), &["push", "-q", "--force", "origin", refspec]);
    }

    /// Commits and pushes `main`.
    fn commit_and_push(&self, message: &str) -> String {
        let id = self.commit(message);
        self.push("HEAD:refs/heads/main");
        id
    }

    fn spec(&self, url: &str, reference: &str, path: &str) -> SourceSpec {
        SourceSpec { url: url.to_owned(), reference: reference.to_owned(), path: path.into() }
    }

    fn open(&self, reference: &str, path: &str) -> Source {
        Source::open(&self.spec(&self.file_url(), reference, path), &self.state()).unwrap()
    }

    /// A source with a state folder of its own (one state folder serves one source at a time).
    fn open_in(&self, state: &str, reference: &str, path: &str) -> Source {
        let spec = self.spec(&self.file_url(), reference, path);
        Source::open(&spec, &self.tmp.path().join(state)).unwrap()
    }
}

/// The error and all its sources, as a log line would show them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

fn paths(source: &Source, commit: &str) -> Vec<String> {
    source.snapshot(commit).unwrap().files.into_iter().map(|f| f.path).collect()
}

fn seeded() -> (Lab, String) {
    let lab = Lab::new();
    lab.write("policies/web.yaml", "rules: [web]\n");
    lab.write("policies/db/db.yml", "rules: [db]\n");
    let first = lab.commit_and_push("Seed policies\n\nWith a body.");
    (lab, first)
}

#[test]
fn first_fetch_clones_and_snapshot_reads_exactly_the_yaml_files_under_the_folder() {
    let lab = Lab::new();
    lab.write("policies/web.yaml", "rules: [web]\n");
    lab.write("policies/db/db.yml", "rules: [db]\n");
    lab.write("policies/deep/er/upper.YAML", "rules: [upper]\n");
    lab.write("policies/README.md", "not a policy\n");
    lab.write("policies/notes.txt", "not a policy\n");
    lab.write("policies/.hidden/skip.yaml", "hidden\n");
    lab.write("policies/.draft.yaml", "hidden\n");
    lab.write("other/elsewhere.yaml", "outside the folder\n");
    lab.write(".github/workflows/ci.yml", "not a policy\n");
    let id = lab.commit_and_push("Seed policies\n\nWith a body.");

    let mut source = lab.open("main", "policies");
    assert!(source.is_local());
    assert_eq!(source.last_fetched(), None);
    let fetched = source.fetch().unwrap();
    assert_eq!(
        fetched,
        Fetched { commit: id.clone(), previous: None, forced: false, recloned: false }
    );
    assert!(fetched.changed());
    assert!(lab.mirror().join("objects").is_dir(), "the mirror is a bare repository");
    assert!(!lab.mirror().join("policies").exists(), "no work tree");

    // Only the one ref was fetched, with only its objects.
    git(&lab.work(), &["checkout", "-q", "-b", "other"]);
    lab.write("policies/other.yaml", "rules: [other]\n");
    let other = lab.commit("Other branch");
    lab.push("other");
    git(&lab.work(), &["tag", "-a", "v0", "-m", "A tag"]);
    lab.push("refs/tags/v0");
    assert_eq!(source.fetch().unwrap().commit, id);
    assert_eq!(git(&lab.mirror(), &["for-each-ref", "--format=%(refname)"]), "refs/fwd/heads/main");
    let has_other = Command::new("git")
        .args(["cat-file", "-e", &other])
        .current_dir(lab.mirror())
        .status()
        .unwrap();
    assert!(!has_other.success(), "objects of another branch were fetched");

    let snapshot = source.snapshot(&id).unwrap();
    assert_eq!(snapshot.commit, id);
    assert_eq!(snapshot.summary, "Seed policies");
    let author_time: i64 = git(&lab.work(), &["log", "-1", "--format=%at", &id]).parse().unwrap();
    assert_eq!(snapshot.author_time, author_time);
    let files: Vec<(&str, &[u8])> =
        snapshot.files.iter().map(|f| (f.path.as_str(), f.bytes.as_slice())).collect();
    assert_eq!(
        files,
        [
            ("policies/db/db.yml", b"rules: [db]\n".as_slice()),
            ("policies/deep/er/upper.YAML", b"rules: [upper]\n".as_slice()),
            ("policies/web.yaml", b"rules: [web]\n".as_slice()),
        ]
    );
}

#[test]
fn the_root_folder_reads_every_policy_but_hidden_ones() {
    let (lab, id) = seeded();
    lab.write(".github/workflows/ci.yml", "not a policy\n");
    lab.write(".gitlab-ci.yml", "not a policy\n");
    lab.write("top.yaml", "rules: []\n");
    let id2 = lab.commit_and_push("More");
    for root in ["", ".", "./"] {
        let mut source = lab.open("main", root);
        assert_eq!(source.fetch().unwrap().commit, id2);
        assert_eq!(paths(&source, &id2), ["policies/db/db.yml", "policies/web.yaml", "top.yaml"]);
        assert_eq!(paths(&source, &id), ["policies/db/db.yml", "policies/web.yaml"]);
    }
}

#[test]
fn a_plain_path_to_a_bare_repository_works_like_a_file_url() {
    let (lab, id) = seeded();
    let spec = lab.spec(lab.remote().to_str().unwrap(), "main", "policies");
    let mut source = Source::open(&spec, &lab.state()).unwrap();
    assert!(source.is_local());
    assert_eq!(source.fetch().unwrap().commit, id);
    assert_eq!(paths(&source, &id), ["policies/db/db.yml", "policies/web.yaml"]);
}

#[test]
fn a_developers_checkout_is_a_local_source() {
    let (lab, _) = seeded();
    lab.write("policies/local.yaml", "rules: [local]\n");
    lab.write("policies/uncommitted.yaml", "never committed\n");
    git(&lab.work(), &["add", "policies/local.yaml"]);
    git(&lab.work(), &["commit", "-q", "-m", "Local only"]);
    let id = git(&lab.work(), &["rev-parse", "HEAD"]);

    let spec = lab.spec(lab.work().to_str().unwrap(), "main", "policies");
    let mut source = Source::open(&spec, &lab.state()).unwrap();
    assert_eq!(source.fetch().unwrap().commit, id, "the checkout's commit, not the remote's");
    assert_eq!(
        paths(&source, &id),
        ["policies/db/db.yml", "policies/local.yaml", "policies/web.yaml"],
        "committed files only"
    );
}

#[test]
fn a_new_commit_is_fetched_and_an_unchanged_remote_reports_no_change() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();

    let pack_dir = lab.mirror().join("objects/pack");
    let packs = || fs::read_dir(&pack_dir).unwrap().count();
    let before = packs();
    let again = source.fetch().unwrap();
    assert_eq!(packs(), before, "an unchanged remote transfers no objects");
    assert_eq!(again.commit, first);
    assert_eq!(again.previous.as_deref(), Some(first.as_str()));
    assert!(!again.changed() && !again.forced && !again.recloned);

    lab.write("policies/web.yaml", "rules: [web, v2]\n");
    lab.remove("policies/db");
    let second = lab.commit_and_push("Second");
    let fetched = source.fetch().unwrap();
    assert_eq!(
        fetched,
        Fetched {
            commit: second.clone(),
            previous: Some(first.clone()),
            forced: false,
            recloned: false
        }
    );
    assert!(fetched.changed());
    let snapshot = source.snapshot(&second).unwrap();
    assert_eq!(snapshot.files.len(), 1);
    assert_eq!(snapshot.files[0].bytes, b"rules: [web, v2]\n");
    assert_eq!(paths(&source, &first), ["policies/db/db.yml", "policies/web.yaml"]);
}

#[test]
fn a_force_push_is_followed_and_reported() {
    let (lab, first) = seeded();
    lab.write("policies/web.yaml", "rules: [bad]\n");
    let bad = lab.commit_and_push("Bad");
    let mut source = lab.open("main", "policies");
    assert_eq!(source.fetch().unwrap().commit, bad);

    git(&lab.work(), &["reset", "-q", "--hard", &first]);
    lab.write("policies/web.yaml", "rules: [fixed]\n");
    let rewritten = lab.commit_and_push("Rewritten");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, rewritten);
    assert_eq!(fetched.previous.as_deref(), Some(bad.as_str()));
    assert!(fetched.forced, "{fetched:?}");
    assert_eq!(source.snapshot(&rewritten).unwrap().files[1].bytes, b"rules: [fixed]\n");
    assert_eq!(source.snapshot(&bad).unwrap().files[1].bytes, b"rules: [bad]\n", "old commit kept");

    // Back to an ancestor (a revert by force-push) is forced too; moving on from it is not.
    lab.push(&format!("{first}:refs/heads/main"));
    assert!(source.fetch().unwrap().forced);
    git(&lab.work(), &["reset", "-q", "--hard", &first]);
    let next = lab.commit_and_push("Next");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, next);
    assert!(!fetched.forced);
}

#[test]
fn a_branch_deleted_on_the_remote_is_an_error_and_the_last_commit_stays_readable() {
    let (lab, _) = seeded();
    git(&lab.work(), &["checkout", "-q", "-b", "feature"]);
    lab.write("policies/feature.yaml", "rules: [feature]\n");
    let feature = lab.commit("Feature");
    lab.push("feature");

    let mut source = lab.open("feature", "policies");
    assert_eq!(source.fetch().unwrap().commit, feature);
    git(&lab.remote(), &["branch", "-D", "feature"]);

    let err = source.fetch().unwrap_err();
    assert!(matches!(&err, SourceError::RefDeleted { last, .. } if *last == feature), "{err:?}");
    assert!(err.is_transient(), "a branch can be pushed again");
    let message = chain(&err);
    assert!(message.contains("'feature'") && message.contains(&feature), "{message}");
    assert!(message.contains(&lab.file_url()), "{message}");
    assert_eq!(source.last_fetched().as_deref(), Some(feature.as_str()));
    assert_eq!(source.snapshot(&feature).unwrap().files.len(), 3);

    // Still so after a restart: the mirror remembers the branch.
    drop(source);
    let mut source = lab.open("feature", "policies");
    assert_eq!(source.last_fetched().as_deref(), Some(feature.as_str()));
    assert!(matches!(source.fetch().unwrap_err(), SourceError::RefDeleted { .. }));

    lab.push("feature");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, feature);
    assert!(!fetched.changed());
}

#[test]
fn a_ref_that_never_existed_is_a_configuration_error() {
    let (lab, _) = seeded();
    let mut source = lab.open("no-such-branch", "policies");
    let err = source.fetch().unwrap_err();
    assert!(matches!(err, SourceError::RefNotFound { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("'no-such-branch'"), "{err}");
}

#[test]
fn a_remote_moved_away_is_transient_and_fetch_recovers_when_it_is_back() {
    let (lab, first) = seeded();
    for url in [lab.file_url(), lab.remote().to_str().unwrap().to_owned()] {
        let state = lab.tmp.path().join(format!("state-{}", url.len()));
        let mut source = Source::open(&lab.spec(&url, "main", "policies"), &state).unwrap();
        assert_eq!(source.fetch().unwrap().commit, first);

        let away = lab.tmp.path().join("moved.git");
        fs::rename(lab.remote(), &away).unwrap();
        let err = source.fetch().unwrap_err();
        assert!(matches!(err, SourceError::Unreachable { .. }), "{err:?}");
        assert!(err.is_transient());
        assert!(chain(&err).contains(lab.remote().to_str().unwrap()), "{}", chain(&err));
        assert_eq!(source.last_fetched().as_deref(), Some(first.as_str()));
        assert_eq!(source.snapshot(&first).unwrap().files.len(), 2, "mirror intact");

        fs::rename(&away, lab.remote()).unwrap();
        let fetched = source.fetch().unwrap();
        assert_eq!(fetched.commit, first);
        assert!(!fetched.recloned);
    }
}

/// Ways a mirror gets damaged, each followed by a fetch that rebuilds it.
#[test]
fn a_damaged_mirror_is_rebuilt_by_the_next_fetch() {
    let (lab, first) = seeded();
    type Damage = (&'static str, fn(&Path));
    let damages: [Damage; 6] = [
        ("objects folder deleted", |m| fs::remove_dir_all(m.join("objects")).unwrap()),
        ("HEAD garbled", |m| fs::write(m.join("HEAD"), "garbage\n").unwrap()),
        ("tracking ref garbled", |m| {
            fs::write(m.join("refs/fwd/heads/main"), "not an object id\n").unwrap();
        }),
        ("objects emptied", |m| {
            for entry in fs::read_dir(m.join("objects")).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    fs::remove_dir_all(&path).unwrap();
                    fs::create_dir(&path).unwrap();
                }
            }
        }),
        ("config garbled", |m| fs::write(m.join("config"), "[[[ not a config").unwrap()),
        ("mirror replaced by a file", |m| {
            fs::remove_dir_all(m).unwrap();
            fs::write(m, "junk").unwrap();
        }),
    ];
    for (what, damage) in damages {
        let _ = fs::remove_dir_all(lab.state());
        let mut source = lab.open("main", "policies");
        source.fetch().unwrap();
        damage(&lab.mirror());
        let fetched = source.fetch().unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
        assert_eq!(fetched.commit, first, "{what}");
        assert!(fetched.recloned, "{what}");
        assert_eq!(paths(&source, &first), ["policies/db/db.yml", "policies/web.yaml"], "{what}");
        assert!(
            !lab.state().join("mirror.git.new").exists()
                && !lab.state().join("mirror.git.old").exists()
        );
        // And a fresh process opens the rebuilt mirror as its own.
        drop(source);
        let mut reopened = lab.open("main", "policies");
        assert_eq!(reopened.last_fetched().as_deref(), Some(first.as_str()), "{what}");
        assert!(!reopened.fetch().unwrap().recloned, "{what}");
    }
}

#[test]
fn a_damaged_mirror_at_start_up_is_replaced_when_opened() {
    let (lab, first) = seeded();
    fs::create_dir_all(lab.mirror()).unwrap();
    fs::write(lab.mirror().join("HEAD"), "junk").unwrap();
    let mut source = lab.open("main", "policies");
    assert_eq!(source.last_fetched(), None);
    assert_eq!(source.fetch().unwrap().commit, first);
}

#[test]
fn a_damaged_mirror_and_an_unreachable_remote_fail_transiently_then_recover() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    fs::write(lab.mirror().join("refs/fwd/heads/main"), "garbage\n").unwrap();
    let away = lab.tmp.path().join("moved.git");
    fs::rename(lab.remote(), &away).unwrap();
    let err = source.fetch().unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(lab.mirror().is_dir(), "the old mirror stays until a rebuild succeeds");
    assert!(!lab.state().join("mirror.git.new").exists());
    fs::rename(&away, lab.remote()).unwrap();
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, first);
    assert!(fetched.recloned && !fetched.forced);
}

#[test]
fn a_tag_reference_is_peeled_to_its_commit_and_followed_when_moved() {
    let (lab, first) = seeded();
    git(&lab.work(), &["tag", "-a", "v1", "-m", "Release 1"]);
    git(&lab.work(), &["tag", "light"]);
    lab.push("refs/tags/v1");
    lab.push("refs/tags/light");
    let second = lab.commit_and_push("After the tag");

    for reference in ["v1", "refs/tags/v1", "light"] {
        let state = lab.tmp.path().join(format!("state-{}", reference.replace('/', "-")));
        let spec = lab.spec(&lab.file_url(), reference, "policies");
        let mut source = Source::open(&spec, &state).unwrap();
        let fetched = source.fetch().unwrap();
        assert_eq!(fetched.commit, first, "{reference} is the tagged commit, not main");
        assert_eq!(paths(&source, &first).len(), 2);
    }

    let mut source = lab.open("v1", "policies");
    source.fetch().unwrap();
    git(&lab.work(), &["tag", "-f", "-a", "v1", "-m", "Release 1, again"]);
    lab.push("refs/tags/v1");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, second);
    assert!(!fetched.forced, "moved forward");
}

#[test]
fn a_branch_wins_over_a_tag_of_the_same_name_and_head_follows_the_default_branch() {
    let (lab, first) = seeded();
    git(&lab.work(), &["tag", "main", &first]);
    lab.push("refs/tags/main");
    let second = lab.commit_and_push("Second");
    let mut source = lab.open("main", "policies");
    assert_eq!(source.fetch().unwrap().commit, second);
    let mut head = Source::open(
        &lab.spec(&lab.file_url(), "HEAD", "policies"),
        &lab.tmp.path().join("state-head"),
    )
    .unwrap();
    assert_eq!(head.fetch().unwrap().commit, second);
}

#[test]
fn a_missing_policy_folder_or_a_file_in_its_place_is_a_clear_error() {
    let (lab, id) = seeded();
    lab.write("docs", "a file\n");
    let id2 = lab.commit_and_push("A file named docs");
    let mut source = lab.open("main", "no/such/folder");
    assert_eq!(source.fetch().unwrap().commit, id2, "fetching does not need the folder");
    let err = source.snapshot(&id).unwrap_err();
    assert!(matches!(&err, SourceError::PathNotFound { path, .. } if path == "no"), "{err:?}");
    assert!(!err.is_transient());
    let message = err.to_string();
    assert!(message.contains(&id) && message.contains("'no'"), "{message}");

    let mut source = lab.open_in("state-docs", "main", "docs");
    source.fetch().unwrap();
    let err = source.snapshot(&id2).unwrap_err();
    assert!(matches!(err, SourceError::NotAFolder { .. }), "{err:?}");
    let mut source = lab.open_in("state-file", "main", "policies/web.yaml");
    source.fetch().unwrap();
    assert!(matches!(source.snapshot(&id2).unwrap_err(), SourceError::NotAFolder { .. }));
}

#[test]
fn snapshot_of_a_bad_or_unknown_commit_id_is_an_error() {
    let (lab, id) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    for bad in ["", "main", "HEAD", &id[..12], "zz"] {
        let err = source.snapshot(bad).unwrap_err();
        assert!(matches!(err, SourceError::InvalidCommit { .. }), "{bad:?}: {err:?}");
    }
    let err = source.snapshot(&"ab".repeat(20)).unwrap_err();
    assert!(matches!(err, SourceError::UnknownCommit { .. }), "{err:?}");
    let tree = git(&lab.work(), &["rev-parse", "HEAD^{tree}"]);
    assert!(matches!(source.snapshot(&tree).unwrap_err(), SourceError::UnknownCommit { .. }));
}

#[test]
fn a_symlink_under_the_policy_folder_is_an_error_and_elsewhere_it_is_ignored() {
    let (lab, _) = seeded();
    lab.symlink("policies/linked.yaml", "web.yaml");
    let with_link = lab.commit_and_push("Link a policy");
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    let err = source.snapshot(&with_link).unwrap_err();
    assert!(
        matches!(&err, SourceError::Symlink { path, .. } if path == "policies/linked.yaml"),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("not followed"), "{err}");

    // Any name: a linked folder would hide policies as well.
    lab.remove("policies/linked.yaml");
    lab.symlink("policies/shared", "../outside");
    let dir_link = lab.commit_and_push("Link a folder");
    source.fetch().unwrap();
    assert!(matches!(source.snapshot(&dir_link).unwrap_err(), SourceError::Symlink { .. }));

    // The policy folder itself a link.
    let mut linked_folder = lab.open_in("state-link", "main", "policies/shared");
    linked_folder.fetch().unwrap();
    assert!(matches!(linked_folder.snapshot(&dir_link).unwrap_err(), SourceError::Symlink { .. }));

    // Outside the folder, or hidden, a link does not matter.
    lab.remove("policies/shared");
    lab.symlink("elsewhere.yaml", "policies/web.yaml");
    lab.symlink("policies/.editor.yaml", "web.yaml");
    let outside = lab.commit_and_push("Links outside");
    source.fetch().unwrap();
    assert_eq!(paths(&source, &outside), ["policies/db/db.yml", "policies/web.yaml"]);
}

#[test]
fn a_submodule_under_the_policy_folder_is_an_error() {
    let (lab, id) = seeded();
    // A gitlink entry, as `git submodule add` records it, without a second repository.
    git(
        &lab.work(),
        &["update-index", "--add", "--cacheinfo", &format!("160000,{id},policies/vendored")],
    );
    git(&lab.work(), &["commit", "-q", "-m", "Submodule"]);
    let with_submodule = git(&lab.work(), &["rev-parse", "HEAD"]);
    lab.push("main");
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    let err = source.snapshot(&with_submodule).unwrap_err();
    assert!(
        matches!(&err, SourceError::Submodule { path, .. } if path == "policies/vendored"),
        "{err:?}"
    );
}

#[test]
fn the_limits_on_files_sizes_and_depth_are_enforced_with_clear_errors() {
    let (lab, _) = seeded();
    lab.write("policies/big.yaml", &"x".repeat(1000));
    lab.write("policies/a/b/c/d.yaml", "deep\n");
    let id = lab.commit_and_push("Big and deep");
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    let generous =
        Limits { max_files: 4, max_file_bytes: 1000, max_total_bytes: 2000, max_depth: 3 };
    source.set_limits(generous);
    assert_eq!(source.snapshot(&id).unwrap().files.len(), 4, "exactly at every limit");

    source.set_limits(Limits { max_files: 3, ..generous });
    let err = source.snapshot(&id).unwrap_err();
    assert!(matches!(err, SourceError::TooManyFiles { limit: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("more than 3 policy files under 'policies'"), "{err}");

    source.set_limits(Limits { max_file_bytes: 999, ..generous });
    let err = source.snapshot(&id).unwrap_err();
    assert!(
        matches!(&err, SourceError::FileTooLarge { path, size: 1000, limit: 999, .. }
            if path == "policies/big.yaml"),
        "{err:?}"
    );
    assert!(err.to_string().contains("'policies/big.yaml'"), "{err}");

    source.set_limits(Limits { max_total_bytes: 1010, ..generous });
    let err = source.snapshot(&id).unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { limit: 1010, .. }), "{err:?}");

    source.set_limits(Limits { max_depth: 2, ..generous });
    let err = source.snapshot(&id).unwrap_err();
    assert!(
        matches!(&err, SourceError::TooDeep { path, .. } if path == "policies/a/b/c"),
        "{err:?}"
    );
    assert!(!err.is_transient());
}

#[test]
fn watch_fires_after_a_commit_into_a_local_checkout() {
    let (lab, _) = seeded();
    let spec = lab.spec(lab.work().to_str().unwrap(), "main", "policies");
    let mut source = Source::open(&spec, &lab.state()).unwrap();
    source.fetch().unwrap();
    let (tx, rx) = mpsc::channel();
    let watch = source
        .watch(move || {
            let _ = tx.send(());
        })
        .unwrap();

    lab.write("policies/new.yaml", "rules: [new]\n");
    let id = lab.commit("New policy");
    rx.recv_timeout(Duration::from_secs(10)).expect("watch fired after the commit");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, id);
    drop(watch);
}

#[test]
fn watch_fires_after_a_push_into_a_local_bare_repository() {
    let (lab, _) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    let (tx, rx) = mpsc::channel();
    let _watch = source
        .watch(move || {
            let _ = tx.send(());
        })
        .unwrap();
    // Nothing moved yet: a quiet repository does not fire (give it a few debounce periods).
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "fired with nothing moved");

    let id = lab.commit_and_push("Pushed");
    rx.recv_timeout(Duration::from_secs(10)).expect("watch fired after the push");
    assert_eq!(source.fetch().unwrap().commit, id);
    // The fetch itself reads the repository's refs: that is not a change.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a fetch fired the watch");

    // And again after the ref is packed (git gc writes packed-refs and removes the loose ref).
    git(&lab.remote(), &["pack-refs", "--all"]);
    while rx.try_recv().is_ok() {}
    let id = lab.commit_and_push("Pushed onto packed refs");
    rx.recv_timeout(Duration::from_secs(10)).expect("watch fired after the second push");
    assert_eq!(source.fetch().unwrap().commit, id);
}

#[test]
fn watch_refuses_a_remote_source() {
    let lab = Lab::new();
    let spec = lab.spec("https://git.example.com/org/policies.git", "main", "policies");
    let source = Source::open(&spec, &lab.state()).unwrap();
    assert!(!source.is_local());
    assert!(matches!(source.watch(|| {}).unwrap_err(), SourceError::NotLocal { .. }));
}

#[test]
fn credentials_never_appear_in_errors_or_debug_output() {
    let lab = Lab::new();
    // Port 1 on the loopback: nothing listens, so the connection is refused at once.
    for scheme in ["https", "ssh"] {
        let url = format!("{scheme}://deploy-bot:s3cr3t-t0ken-value@127.0.0.1:1/org/policies.git");
        let spec = lab.spec(&url, "main", "policies");
        let state = lab.tmp.path().join(scheme);
        let mut source = Source::open(&spec, &state).unwrap();
        let err = source.fetch().unwrap_err();
        assert!(matches!(err, SourceError::Unreachable { .. }), "{err:?}");
        assert!(err.is_transient());
        let shown = [chain(&err), format!("{err:?}"), format!("{source:?}"), format!("{spec:?}")];
        for text in &shown {
            assert!(!text.contains("s3cr3t") && !text.contains("deploy-bot"), "{text}");
        }
        let display = format!("{scheme}://127.0.0.1:1/org/policies.git");
        assert!(shown[0].contains(&display), "{}", shown[0]);
        assert_eq!(source.display_url(), display);
        let config = fs::read_to_string(state.join("mirror.git/config")).unwrap();
        assert!(!config.contains("s3cr3t"), "credentials written to disk: {config}");
    }

    let bad = lab.spec("ftp://user:s3cr3t@host/x", "main", "policies");
    let err = Source::open(&bad, &lab.state()).unwrap_err();
    assert!(!chain(&err).contains("s3cr3t"), "{}", chain(&err));
}

#[test]
fn invalid_urls_refs_and_paths_are_configuration_errors() {
    let lab = Lab::new();
    let url = lab.file_url();
    for (spec, field) in [
        (lab.spec("ftp://host/repo", "main", "p"), "url"),
        (lab.spec("", "main", "p"), "url"),
        (lab.spec(&url, "", "p"), "ref"),
        (lab.spec(&url, "a..b", "p"), "ref"),
        (lab.spec(&url, "main", "/etc/fw"), "path"),
        (lab.spec(&url, "main", "../up"), "path"),
    ] {
        let err = Source::open(&spec, &lab.state()).unwrap_err();
        assert!(
            matches!(&err, SourceError::InvalidSpec { field: f, .. } if *f == field),
            "{spec:?}: {err:?}"
        );
        assert!(!err.is_transient());
    }
}

#[test]
fn open_needs_no_network_and_a_restart_reads_the_last_commit_offline() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    drop(source);
    let away = lab.tmp.path().join("moved.git");
    fs::rename(lab.remote(), &away).unwrap();

    let source = lab.open("main", "policies");
    assert_eq!(source.last_fetched().as_deref(), Some(first.as_str()));
    assert_eq!(paths(&source, &first), ["policies/db/db.yml", "policies/web.yaml"]);
}

#[test]
fn a_mirror_of_another_url_is_replaced() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    drop(source);

    let other = lab.tmp.path().join("other.git");
    git(lab.tmp.path(), &["clone", "-q", "--bare", lab.remote().to_str().unwrap(), "other.git"]);
    let spec = lab.spec(other.to_str().unwrap(), "main", "policies");
    let mut source = Source::open(&spec, &lab.state()).unwrap();
    assert_eq!(source.last_fetched(), None, "nothing carried over from the other URL");
    let fetched = source.fetch().unwrap();
    assert_eq!(fetched.commit, first);
    assert_eq!(fetched.previous, None);
}

#[test]
fn a_fetch_over_its_timeout_is_a_transient_error_that_leaves_the_mirror_alone() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    lab.write("policies/web.yaml", "rules: [slow]\n");
    let second = lab.commit_and_push("Second");
    source.set_fetch_timeout(Duration::ZERO);
    let err = source.fetch().unwrap_err();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert_eq!(source.last_fetched().as_deref(), Some(first.as_str()));
    source.set_fetch_timeout(Duration::from_secs(60));
    assert_eq!(source.fetch().unwrap().commit, second);
}

/// Commits one file straight into the remote's `main` with libgit2: much faster than the git
/// command line when a test needs many commits.
fn commit_in_remote(lab: &Lab, path: &str, content: &str) -> String {
    let repo = git2::Repository::open_bare(lab.remote()).unwrap();
    let parent = repo.find_reference("refs/heads/main").unwrap().peel_to_commit().unwrap();
    let blob = repo.blob(content.as_bytes()).unwrap();
    let mut update = git2::build::TreeUpdateBuilder::new();
    update.upsert(path, blob, git2::FileMode::Blob);
    let tree = update.create_updated(&repo, &parent.tree().unwrap()).unwrap();
    let tree = repo.find_tree(tree).unwrap();
    let signature = git2::Signature::now("Policy Author", "author@example.com").unwrap();
    let id = repo
        .commit(Some("refs/heads/main"), &signature, &signature, content, &tree, &[&parent])
        .unwrap();
    id.to_string()
}

#[test]
fn many_fetches_do_not_pile_up_packs_and_keep_every_commit() {
    let (lab, first) = seeded();
    let mut source = lab.open("main", "policies");
    source.fetch().unwrap();
    let mut commits = vec![first];
    let changes = 40;
    for n in 0..changes {
        commits.push(commit_in_remote(&lab, "policies/web.yaml", &format!("rules: [web{n}]\n")));
        assert_eq!(source.fetch().unwrap().commit, *commits.last().unwrap());
    }
    let packs = fs::read_dir(lab.mirror().join("objects/pack"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "pack"))
        .count();
    assert!(packs < changes, "{packs} packs after {changes} fetches that each added one");
    for (n, commit) in commits.iter().enumerate().skip(1) {
        let snapshot = source.snapshot(commit).unwrap();
        let web = snapshot.files.iter().find(|f| f.path == "policies/web.yaml").unwrap();
        assert_eq!(web.bytes, format!("rules: [web{}]\n", n - 1).as_bytes());
    }
    drop(source);
    let mut reopened = lab.open("main", "policies");
    assert!(!reopened.fetch().unwrap().recloned, "the compacted mirror passes the check");
}

#[test]
fn one_state_folder_serves_one_source_at_a_time() {
    let (lab, _) = seeded();
    let source = lab.open("main", "policies");
    let spec = lab.spec(&lab.file_url(), "main", "policies");
    let err = Source::open(&spec, &lab.state()).unwrap_err();
    assert!(matches!(err, SourceError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(source);
    Source::open(&spec, &lab.state()).unwrap();
}
