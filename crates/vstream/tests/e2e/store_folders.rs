//! vstream deletes only inside folders it made: a named store's folder must
//! be new, empty or vstream's own (its `.vstream-store` marker), may not be
//! `/`, overlap the data folder or another store, and the cleanup of a
//! store's `tmp/` leaves every file vstream did not write there.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have, skip, wait_for, TestEtcd, TestServer};

/// `vstream store list --json`.
fn stores(s: &TestServer) -> serde_json::Value {
    serde_json::from_str(&s.cli_ok(&["store", "list", "--json"])).expect("store list --json")
}

fn store_names(s: &TestServer) -> Vec<String> {
    stores(s)
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// `store add NAME --path PATH`, expected to fail; its message.
fn refused(s: &TestServer, name: &str, path: &Path) -> String {
    let out = s.cli(&["store", "add", name, "--path", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "store {name} at {} was accepted",
        path.display()
    );
    assert!(
        !store_names(s).contains(&name.to_owned()),
        "the refused store {name} was recorded anyway"
    );
    err
}

fn marker(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(".vstream-store")).ok()
}

/// `/` is refused. The server runs in a mount namespace of its own with a
/// tmpfs on /tmp, and its data folder outside /tmp: should it ever take `/`
/// as a store, it empties that private /tmp, not this machine's.
#[test]
fn a_store_at_the_root_of_the_file_system_is_refused() {
    if !have("unshare") {
        return;
    }
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("cannot make a mount namespace here (needs root)");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs tmpfs /tmp && exec \"$0\" \"$@\"",
    ];
    let s = TestServer::start_wrapped(dir.path().join("data"), "127.0.0.1", &wrap, &[]);
    let e = refused(&s, "everything", Path::new("/"));
    assert!(e.contains("root of the file system"), "{e}");
    // Other spellings of it.
    refused(&s, "everything", Path::new("//"));
    refused(&s, "everything", Path::new("/tmp/.."));
}

#[test]
fn a_store_at_or_inside_or_around_the_data_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_in(dir.path().join("data"));
    let e = refused(&s, "same", &s.data);
    assert!(e.contains("data folder"), "{e}");
    let e = refused(&s, "inside", &s.data.join("stores/inside"));
    assert!(e.contains("data folder"), "{e}");
    let e = refused(&s, "around", dir.path());
    assert!(e.contains("data folder"), "{e}");
    // The data folder carries vstream's marker too.
    let m = marker(&s.data).expect("the data folder has a marker");
    assert!(m.contains("store = \"default\""), "{m}");
}

#[test]
fn a_store_at_or_inside_another_stores_path_is_refused() {
    let s = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let one = dir.path().join("one");
    s.cli_ok(&["store", "add", "one", "--path", one.to_str().unwrap()]);
    let e = refused(&s, "two", &one);
    assert!(e.contains("store one"), "{e}");
    let e = refused(&s, "three", &one.join("sub"));
    assert!(e.contains("store one"), "{e}");
    let e = refused(&s, "four", dir.path());
    assert!(e.contains("store one"), "{e}");
}

#[test]
fn a_non_empty_folder_vstream_did_not_make_is_refused() {
    let s = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(foreign.join("tmp/project")).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    std::fs::write(foreign.join("tmp/project/work.c"), "int main;").unwrap();
    let e = refused(&s, "foreign", &foreign);
    assert!(e.contains("notes.txt") && e.contains("did not make"), "{e}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(foreign.join("tmp/project/work.c").is_file());
    assert!(!foreign.join("vdisks").exists(), "the folder was prepared");
}

#[test]
fn an_empty_folder_and_a_folder_with_vstreams_marker_are_accepted() {
    let s = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    s.cli_ok(&["store", "add", "empty", "--path", empty.to_str().unwrap()]);
    let new = dir.path().join("new");
    s.cli_ok(&["store", "add", "new", "--path", new.to_str().unwrap()]);
    // A store folder from before (its store removed and added again):
    // vstream's marker, vDisk folders, and a file of the user's.
    let marked = dir.path().join("marked");
    std::fs::create_dir_all(marked.join("vdisks")).unwrap();
    std::fs::write(marked.join(".vstream-store"), "store = \"marked\"\n").unwrap();
    std::fs::write(marked.join("README"), "mine").unwrap();
    s.cli_ok(&["store", "add", "marked", "--path", marked.to_str().unwrap()]);
    // Each is held, and marked as the store's.
    for (name, path) in [("empty", &empty), ("new", &new), ("marked", &marked)] {
        wait_for(10, &format!("store {name} held"), || {
            path.join("vdisks").is_dir().then_some(())
        });
        let m = marker(path).unwrap_or_default();
        assert!(m.contains(&format!("store = \"{name}\"")), "{name}: {m:?}");
    }
    assert!(marked.join("README").is_file());
    // A marker naming another store is that store's folder.
    let e = refused(&s, "other", &dir.path().join("elsewhere/../marked"));
    assert!(e.contains(".."), "{e}");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join(".vstream-store"), "store = \"marked\"\n").unwrap();
    let e = refused(&s, "other", &theirs);
    assert!(e.contains("store \"marked\""), "{e}");
}

/// Files vstream did not write in a store's tmp/ and in the data folder's
/// tmp/ (and replication/) survive holding the store and restarts;
/// vstream's own leftovers go.
#[test]
fn foreign_files_in_tmp_survive_restarts() {
    let mut s = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fast = dir.path().join("fast");
    s.cli_ok(&["store", "add", "fast", "--path", fast.to_str().unwrap()]);
    wait_for(10, "store fast held", || {
        fast.join("tmp").is_dir().then_some(())
    });
    s.cli_ok(&["vdisk", "create", "d", "--size", "1MiB", "--store", "fast"]);
    let plant = |root: &Path| -> Vec<PathBuf> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(tmp.join("build/obj")).unwrap();
        std::fs::write(tmp.join("build/obj/a.o"), "x").unwrap();
        std::fs::write(tmp.join("notes.txt"), "mine").unwrap();
        std::fs::write(tmp.join("import-x.layer"), "not one of ours").unwrap();
        // vstream's own leftovers, from a crash.
        std::fs::write(tmp.join("import-d-0a1b2c3d.layer"), "").unwrap();
        std::fs::create_dir_all(tmp.join("deleted-d-12345/x")).unwrap();
        // The replication folder's tidy leaves foreign files too.
        let rep = root.join("replication");
        std::fs::create_dir_all(rep.join("d")).unwrap();
        std::fs::create_dir_all(rep.join("other")).unwrap();
        std::fs::write(rep.join("d/notes.txt"), "mine").unwrap();
        std::fs::write(rep.join("other/README"), "mine").unwrap();
        vec![
            tmp.join("build/obj/a.o"),
            tmp.join("notes.txt"),
            tmp.join("import-x.layer"),
            rep.join("d/notes.txt"),
            rep.join("other/README"),
        ]
    };
    let mut keep = plant(&fast);
    keep.extend(plant(&s.data));
    for _ in 0..2 {
        assert!(s.stop().success());
        s.restart();
        wait_for(10, "store fast held again", || {
            (store_names(&s).contains(&"fast".to_owned())
                && s.cli_ok(&["vdisk", "list"]).contains('d'))
            .then_some(())
        });
        std::thread::sleep(std::time::Duration::from_secs(2));
        for f in &keep {
            assert!(f.is_file(), "{} was removed", f.display());
        }
        for root in [&fast, &s.data] {
            assert!(!root.join("tmp/import-d-0a1b2c3d.layer").exists());
            assert!(!root.join("tmp/deleted-d-12345").exists());
        }
        plant(&fast);
        plant(&s.data);
    }
}

/// On a farm, each server checks its own folder for a store when it comes
/// to hold it: a folder there that vstream did not make, or one that
/// overlaps that server's data folder, is reported as the store's problem
/// on that server and left as it is.
#[test]
fn each_server_refuses_its_own_bad_folder_and_says_why() {
    if !have("curl") {
        return;
    }
    let Some(etcd) = TestEtcd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign-on-s2");
    std::fs::create_dir_all(foreign.join("tmp")).unwrap();
    std::fs::write(foreign.join("tmp/work.txt"), "mine").unwrap();
    std::fs::write(foreign.join("photo.jpg"), "mine").unwrap();
    let s2_data = dir.path().join("s2");
    let overlap = s2_data.join("inside");
    let flags = [
        format!("a={}", foreign.display()),
        format!("b={}", overlap.display()),
    ];
    let s1 = common::farm_member(dir.path(), &etcd, 1, &[]);
    let _s2 = common::farm_member(
        dir.path(),
        &etcd,
        2,
        &["--store-path", &flags[0], "--store-path", &flags[1]],
    );
    for name in ["a", "b"] {
        let path = dir.path().join(format!("{name}-farm"));
        s1.cli_ok(&["store", "add", name, "--path", path.to_str().unwrap()]);
    }
    let problem = |store: &str, server: &str| -> Option<String> {
        stores(&s1)
            .as_array()?
            .iter()
            .find(|v| v["name"] == store)?["servers"]
            .as_array()?
            .iter()
            .find(|h| h["server"] == server)?["problem"]
            .as_str()
            .map(str::to_owned)
    };
    let a = wait_for(15, "s2 reporting store a's problem", || problem("a", "s2"));
    assert!(a.contains("did not make"), "{a}");
    let b = wait_for(15, "s2 reporting store b's problem", || problem("b", "s2"));
    assert!(b.contains("data folder"), "{b}");
    assert_eq!(problem("a", "s1"), None, "s1's folder for a is fine");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(foreign.join("tmp/work.txt").is_file());
    assert!(!foreign.join("vdisks").exists(), "the folder was prepared");
    assert!(!overlap.exists(), "a store was made inside the data folder");
}
