-- `detector_results`: the current result of every evaluation, the latest
-- revision of each detector, model version, statistic and period
-- (`detector_runs` keeps every revision: a period evaluated again after
-- late data has one row per revision).
CREATE VIEW detector_results AS
SELECT * EXCLUDE (rn) FROM (
    SELECT *, row_number() OVER (
        PARTITION BY detector, model_id, model_version, statistic, current_start
        ORDER BY coalesce(revision, 0) DESC) AS rn
    FROM detector_runs
) WHERE rn = 1
