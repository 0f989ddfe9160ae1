//! Two first loads racing on the same fresh bpffs root: exactly one loads and pins, the other
//! waits for the root's lock and adopts what the first pinned, so both hold the same programs.
//! Without the lock both see an empty root, both load, and the second's pins collide with the
//! first's (and its clean-up removes them).

use fw_dataplane_tests::harness::PinRoot;
use std::sync::{Arc, Barrier};

use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::privileged;
use fw_loader::{Dataplane, Error, Opened};

#[test]
fn racing_first_loads_load_once_and_the_other_adopts() {
    if !privileged("racing_first_loads_load_once_and_the_other_adopts") {
        return;
    }
    const RACERS: usize = 3;
    for round in 0..3 {
        let root = PinRoot::new("race");
        assert!(!root.0.exists());
        let start = Arc::new(Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let (root, start) = (root.0.clone(), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    let (dp, opened) = Dataplane::open_pinned(&root, &Capacities::default())?;
                    Ok::<_, Error>((opened, dp.ingress_program_id()?))
                })
            })
            .collect();
        let results: Vec<(Opened, u32)> = racers
            .into_iter()
            .map(|r| r.join().expect("racer panicked").expect("open_pinned"))
            .collect();
        let loaded = results.iter().filter(|(o, _)| *o == Opened::Loaded).count();
        assert_eq!(loaded, 1, "round {round}: exactly one racer loads");
        let ids: Vec<u32> = results.iter().map(|(_, id)| *id).collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "round {round}: one program: {ids:?}");
        // The pins are whole: a later process adopts the same program.
        let later = Dataplane::adopt(&root.0).expect("adopt");
        assert_eq!(later.ingress_program_id().expect("id"), ids[0]);
    }
}

#[test]
fn a_second_load_of_a_pinned_root_is_refused_and_leaves_it_intact() {
    if !privileged("a_second_load_of_a_pinned_root_is_refused_and_leaves_it_intact") {
        return;
    }
    let root = PinRoot::new("reload");
    let first = Dataplane::load_pinned(&root.0, &Capacities::default()).expect("load");
    let id = first.ingress_program_id().expect("id");
    let again = Dataplane::load_pinned(&root.0, &Capacities::default());
    assert!(matches!(again, Err(Error::AlreadyPinned(_))), "{again:?}");
    let adopted = Dataplane::adopt(&root.0).expect("still adoptable");
    assert_eq!(adopted.ingress_program_id().expect("id"), id);
}
