// What Grafana's PostgreSQL data source does with the Driftline SQL
// endpoint, through the two Go drivers Grafana has used: jackc/pgx v4
// (native and through database/sql) and lib/pq. Each connects, runs a
// Grafana-shaped series with timestamp parameters and reflects `metrics`
// through information_schema. Prints one line per check; exits non-zero on
// the first failure.
//
// Usage: goclient DSN EXPECTED_WINDOWS
package main

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v4"
	_ "github.com/jackc/pgx/v4/stdlib"
	_ "github.com/lib/pq"
)

func check(ok bool, what string) {
	if !ok {
		fmt.Println("FAIL " + what)
		os.Exit(1)
	}
	fmt.Println("ok " + what)
}

const series = `SELECT floor(extract(epoch from window_start)/60)*60 AS "time", model_id AS metric,
	sum(inference_count) AS value FROM metrics WHERE window_start BETWEEN $1 AND $2 GROUP BY 1, 2 ORDER BY 1`

func viaDatabaseSQL(driver, dsn string, windows int64) {
	db, err := sql.Open(driver, dsn)
	check(err == nil, driver+" open")
	defer db.Close()
	var n int64
	err = db.QueryRow("SELECT count(*) FROM metrics WHERE window_start > $1", time.Now().Add(-24*time.Hour)).Scan(&n)
	check(err == nil && n == windows, fmt.Sprintf("%s count with a timestamp parameter: %d %v", driver, n, err))
	rows, err := db.Query(series, time.Now().Add(-24*time.Hour), time.Now())
	check(err == nil, fmt.Sprintf("%s series: %v", driver, err))
	points := 0
	for rows.Next() {
		var t, v float64
		var metric string
		check(rows.Scan(&t, &metric, &v) == nil, driver+" scan")
		points++
	}
	rows.Close()
	check(points == 10, fmt.Sprintf("%s series points: %d", driver, points))
	cols, err := db.Query(`SELECT column_name, data_type FROM information_schema.columns
		WHERE table_name = 'metrics' AND column_name = 'window_start'`)
	check(err == nil, fmt.Sprintf("%s information_schema: %v", driver, err))
	var name, typ string
	check(cols.Next() && cols.Scan(&name, &typ) == nil, driver+" column row")
	cols.Close()
	check(typ == "timestamp with time zone", driver+" window_start type: "+typ)
	_, err = db.Exec("SELECT 1 AS x INTO t")
	check(err != nil, fmt.Sprintf("%s SELECT INTO refused: %v", driver, err))
}

func main() {
	dsn := os.Args[1]
	windows, _ := strconv.ParseInt(os.Args[2], 10, 64)
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	check(err == nil, fmt.Sprintf("pgx connect: %v", err))
	var version string
	check(conn.QueryRow(ctx, "SELECT version()").Scan(&version) == nil, "pgx version()")
	check(len(version) > 14 && version[:14] == "PostgreSQL 16.", "pgx version: "+version)
	var since time.Time
	err = conn.QueryRow(ctx, "SELECT min(window_start) FROM metrics WHERE window_start > $1",
		time.Now().Add(-24*time.Hour)).Scan(&since)
	check(err == nil && !since.IsZero(), fmt.Sprintf("pgx timestamptz result: %v %v", since, err))
	conn.Close(ctx)
	viaDatabaseSQL("pgx", dsn, windows)
	viaDatabaseSQL("postgres", dsn, windows)
}
