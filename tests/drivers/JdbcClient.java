// What an analyst's JDBC tool (DBeaver, a notebook, a BI tool) does with the
// Driftline SQL endpoint through PgJDBC: connect, read the catalog through
// DatabaseMetaData, run a prepared statement with timestamp parameters
// (server-side prepared after the driver's threshold) and a Grafana-shaped
// query. Prints one line per check; exits non-zero on the first failure.
//
// Usage: java -cp postgresql.jar JdbcClient.java JDBC_URL EXPECTED_WINDOWS

import java.sql.*;
import java.time.OffsetDateTime;
import java.util.*;

public class JdbcClient {
    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
        System.out.println("ok " + what);
    }

    public static void main(String[] args) throws Exception {
        String url = args[0];
        long windows = Long.parseLong(args[1]);
        try (Connection conn = DriverManager.getConnection(url)) {
            DatabaseMetaData meta = conn.getMetaData();
            check(meta.getDatabaseMajorVersion() == 16, "server major version 16: " + meta.getDatabaseProductVersion());

            Set<String> tables = new HashSet<>();
            try (ResultSet rs = meta.getTables(null, "public", "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            check(tables.containsAll(List.of("metrics", "status", "devices")), "getTables: " + tables);

            Map<String, Integer> columns = new HashMap<>();
            try (ResultSet rs = meta.getColumns(null, "public", "metrics", "%")) {
                while (rs.next()) columns.put(rs.getString("COLUMN_NAME"), rs.getInt("DATA_TYPE"));
            }
            check(columns.get("window_start") == Types.TIMESTAMP_WITH_TIMEZONE
                    || columns.get("window_start") == Types.TIMESTAMP, "getColumns window_start: " + columns.get("window_start"));
            check(columns.get("seq") == Types.BIGINT, "getColumns seq bigint");
            check(columns.get("device_id") == Types.VARCHAR, "getColumns device_id varchar");

            try (ResultSet rs = meta.getPrimaryKeys(null, "public", "metrics")) {
                check(!rs.next(), "getPrimaryKeys: none");
            }
            int types = 0;
            try (ResultSet rs = meta.getTypeInfo()) {
                while (rs.next()) types++;
            }
            check(types > 10, "getTypeInfo: " + types + " types");

            // Prepared with timestamp parameters, run past PgJDBC's
            // prepareThreshold (5) so the server-side statement is used.
            String sql = "SELECT count(*) FROM metrics WHERE window_start >= ? AND window_start < ?";
            try (PreparedStatement ps = conn.prepareStatement(sql)) {
                for (int i = 0; i < 7; i++) {
                    ps.setObject(1, OffsetDateTime.now().minusDays(1));
                    ps.setObject(2, OffsetDateTime.now().plusDays(1));
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check(rs.getLong(1) == windows, "prepared timestamp query, run " + i + ": " + rs.getLong(1));
                    }
                }
            }
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery(
                     "SELECT floor(extract(epoch from window_start)/60)*60 AS \"time\", model_id AS metric, "
                         + "sum(inference_count) AS value FROM metrics GROUP BY 1, 2 ORDER BY 1")) {
                int rows = 0;
                while (rs.next()) rows++;
                check(rows == 10, "Grafana-shaped series: " + rows + " points");
            }
            try (Statement st = conn.createStatement()) {
                st.executeQuery("SELECT 1 AS x INTO t");
                throw new AssertionError("SELECT INTO was accepted");
            } catch (SQLException e) {
                check("25006".equals(e.getSQLState()), "SELECT INTO refused: " + e.getSQLState());
            }
        }
    }
}
