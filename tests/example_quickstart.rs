//! Runs examples/quickstart.rs so CI catches breakage: the example itself checks that the
//! reloaded adapter gives the same outputs, that the merged model matches and that unmerge
//! restores the weight; here we also check that training lowered the loss.

#[allow(dead_code)]
#[path = "../examples/quickstart.rs"]
mod quickstart;

#[test]
fn quickstart_example_runs() {
    let (first, last) = quickstart::run().unwrap();
    assert!(
        last < first,
        "training must lower the loss: {first} -> {last}"
    );
}
