-- name: label_drift
-- description: Predicted labels (the `label` categorical field) of each model version, current period against the reference period. value: PSI of the label shares; p_value: chi-square homogeneity test with the privacy noise of each label count.
-- current: 15m
-- reference: 1h
-- threshold: 0.1 (PSI over 0.1: a moderate shift)
-- alpha: 0.001
-- min_devices: 10
SELECT model_id, model_version,
       'psi_label' AS statistic,
       psi_counts(ref, cur) AS value,
       counts_shift_pvalue(ref, cur, ref_noise, cur_noise) AS p_value,
       js_distance_counts(ref, cur) AS js_distance,
       devices, events, epsilon
FROM (
    SELECT model_id, model_version,
           category_sum(CASE WHEN {in_reference} THEN categories END, 'label') AS ref,
           category_sum(CASE WHEN {in_current} THEN categories END, 'label') AS cur,
           {ref_noise:categories.label} AS ref_noise,
           {cur_noise:categories.label} AS cur_noise,
           count(DISTINCT CASE WHEN {in_current} THEN device_id END) AS devices,
           {cur_sum:inference_count} AS events,
           max(epsilon) AS epsilon
    FROM metrics
    WHERE window_start >= {reference_start} AND window_start < {current_end}
    GROUP BY model_id, model_version
)
WHERE ref IS NOT NULL AND cur IS NOT NULL
