//! Directory mirroring end to end: the real binary, real directories (issue 2).

mod common;

use common::*;

#[test]
fn mirrors_a_small_tree() {
    let env = Env::dirs("", "prune = true");
    write(env.src().join("a/b.txt"), "hello");
    let (scan, project) = env.sync();
    assert_eq!(scan["upserts"], 2);
    assert_eq!(kind_outcome(&project, "file", "created"), 1);
    assert_mirror(&env.src(), &env.dst());
}
