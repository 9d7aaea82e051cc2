//! The PostgreSQL test harness itself: a server starts as the right user, takes connections,
//! survives an immediate shutdown and a restart, and is gone after drop.

mod support;

#[tokio::test]
async fn a_test_server_starts_restarts_and_stops() {
    let Some(mut pg) = support::pg::PgServer::start("a_test_server_starts_restarts_and_stops") else { return };
    let connect = |url: String| async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    };
    let c = connect(pg.url()).await;
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await.unwrap();
    pg.stop("immediate");
    assert!(tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.is_err());
    pg.restart();
    let c = connect(pg.url()).await;
    let row = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "a committed row survives an immediate shutdown");
    let data = pg.data.clone();
    drop(pg);
    assert!(!data.exists(), "the server's folder is removed on drop");
}
