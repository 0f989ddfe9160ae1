//! The production ingress program leaves room under the verifier's limit. The verifier walks
//! every path through the program and refuses it past 1,000,000 processed instructions; a
//! change that multiplies paths (an inlined lookup whose results differ per path, a loop the
//! verifier unrolls) can bring it there without any other symptom, and a kernel whose verifier
//! walks a little differently would then refuse the firewall at start-up. This catches the
//! growth while there is still room to restructure.

use fw_compiler::mapstate::Capacities;
use fw_dataplane_tests::harness::privileged;
use fw_loader::Dataplane;

/// The most processed instructions the production program may take: 85% of the limit.
const BUDGET: u32 = 850_000;

#[test]
fn the_ingress_program_stays_within_its_verifier_budget() {
    if !privileged("the_ingress_program_stays_within_its_verifier_budget") {
        return;
    }
    let dp = Dataplane::load(&Capacities::default()).expect("load");
    let Some(processed) = dp.ingress_verified_instructions().expect("program info") else {
        eprintln!("this kernel does not report verified instructions; nothing to check");
        return;
    };
    eprintln!("fw_ingress: {processed} verified instructions");
    assert!(processed > 0);
    assert!(
        processed <= BUDGET,
        "the verifier processed {processed} instructions of fw_ingress, over the budget of \
         {BUDGET} (the limit is 1,000,000): restructure before adding paths"
    );
}
