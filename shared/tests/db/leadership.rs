//! The reconciler's leadership: one holder at a time, and a new term at each
//! change of hands.

use std::time::Duration;

use shared::db::leadership::{self, Claim, RECONCILER};
use shared::testing::db;
use uuid::Uuid;

#[sqlx::test(migrator = "shared::db::MIGRATOR")]
async fn the_leadership_has_one_holder_and_a_new_term_at_each_change(pool: sqlx::PgPool) {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let ttl = Duration::from_secs(30);
    let Claim::Held { term: first, remaining } = leadership::claim(&pool, RECONCILER, a, ttl).await.expect("claim")
    else {
        panic!("nobody held it");
    };
    assert!(remaining > Duration::from_secs(29) && remaining <= ttl, "{remaining:?}");
    let renewed = leadership::claim(&pool, RECONCILER, a, ttl).await.expect("claim");
    assert!(matches!(renewed, Claim::Held { term, .. } if term == first), "a renewal keeps the term: {renewed:?}");
    let refused = leadership::claim(&pool, RECONCILER, b, ttl).await.expect("claim");
    assert!(matches!(refused, Claim::Elsewhere { holder, .. } if holder == a), "{refused:?}");

    // A lapses (as a frozen holder does); B takes it with the next term.
    db::lapse_leadership(&pool).await;
    let Claim::Held { term: second, .. } = leadership::claim(&pool, RECONCILER, b, ttl).await.expect("claim") else {
        panic!("a lapsed leadership is free");
    };
    assert_eq!(second.term, first.term + 1);
    // A wakes: it neither gets it back nor can give B's away.
    assert!(matches!(leadership::claim(&pool, RECONCILER, a, ttl).await.expect("claim"), Claim::Elsewhere { .. }));
    leadership::release(&pool, RECONCILER, first).await.expect("release");
    assert_eq!(leadership::current(&pool, RECONCILER).await.expect("query"), Some((second, true)));
    // B gives it up cleanly: free at once, and even B's own next term is a new one.
    leadership::release(&pool, RECONCILER, second).await.expect("release");
    let Claim::Held { term: third, .. } = leadership::claim(&pool, RECONCILER, b, ttl).await.expect("claim") else {
        panic!("a released leadership is free");
    };
    assert_eq!(third.term, second.term + 1);
}
