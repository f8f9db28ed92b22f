-- `retrain_jobs`: one row per retraining job with its latest status
-- (from the append-only `retrain_job_events`).
CREATE VIEW retrain_jobs AS
SELECT j.job_id, j.model_id, j.model_version, j.status, c.created_at, j.at AS updated_at,
       j.detail, c.period_end, c.evidence
FROM (
    SELECT *, row_number() OVER (
        PARTITION BY job_id ORDER BY at DESC,
        CASE status WHEN 'pending' THEN 0 WHEN 'dispatched' THEN 1 WHEN 'acknowledged' THEN 2 ELSE 3 END DESC
    ) AS rn
    FROM retrain_job_events
) j
JOIN (
    SELECT job_id, min(at) AS created_at, max(period_end) AS period_end, max(evidence) AS evidence
    FROM retrain_job_events GROUP BY job_id
) c ON j.job_id = c.job_id
WHERE j.rn = 1
