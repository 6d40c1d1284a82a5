//! Migrating (`api migrate`, and `api serve` at start): creates a missing
//! database and applies the migrations, idempotently.

use shared::config::DatabaseSettings;
use shared::db;

#[tokio::test]
async fn migrate_creates_a_missing_database_and_can_run_again() {
    let server = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
    let name = format!("conveyor_migrate_{}", uuid::Uuid::now_v7().simple());
    let mut settings = shared::config::Settings::defaults().expect("defaults").database;
    settings.url = format!("{base}/{name}");

    let exists = |settings: DatabaseSettings| async move {
        <sqlx::Postgres as sqlx::migrate::MigrateDatabase>::database_exists(&settings.url).await.expect("ask")
    };
    assert!(!exists(settings.clone()).await);
    for _ in 0..2 {
        let pool = db::pool(&settings).expect("pool");
        db::migrate(&settings, &pool).await.expect("migrate");
        let columns = shared::testing::db::columns(&pool, "jobs").await;
        // Every field of a job.
        for field in [
            "id",
            "tenant",
            "queue",
            "type",
            "payload",
            "status",
            "priority",
            "attempt",
            "max_attempts",
            "timeout_seconds",
            "run_at",
            "progress",
            "result",
            "error",
            "idempotency_key",
            "created_at",
            "started_at",
            "finished_at",
            "updated_at",
        ] {
            assert!(columns.iter().any(|c| c == field), "jobs lacks {field}");
        }
        let code = shared::testing::db::insert_with_status(&pool, "done").await;
        assert_eq!(code.as_deref(), Some("23514"), "the status check constraint refuses unknown statuses");
        pool.close().await;
    }
    assert!(exists(settings.clone()).await);
    <sqlx::Postgres as sqlx::migrate::MigrateDatabase>::drop_database(&settings.url).await.expect("clean up");
}
