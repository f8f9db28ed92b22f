-- `histogram_edges`: one row per model version with the edges of its four
-- histograms, from the edge sets stored beside `metrics` (the latest
-- date's set when a version's edges changed; `edge_sets` counts the
-- distinct sets, so more than 1 says the version's windows mixed edges).
-- A query joins it on `model_id` and `model_version` after aggregating
-- `metrics`, instead of decoding the `*_edges` list of every row.
CREATE VIEW histogram_edges AS
SELECT model_id, model_version,
       first_value(latency_ms_edges ORDER BY date DESC) AS latency_ms_edges,
       first_value(confidence_edges ORDER BY date DESC) AS confidence_edges,
       first_value(input_tokens_edges ORDER BY date DESC) AS input_tokens_edges,
       first_value(output_tokens_edges ORDER BY date DESC) AS output_tokens_edges,
       count(DISTINCT concat_ws('|', array_to_string(latency_ms_edges, ' '),
                                     array_to_string(confidence_edges, ' '),
                                     array_to_string(input_tokens_edges, ' '),
                                     array_to_string(output_tokens_edges, ' '))) AS edge_sets
FROM histogram_edge_sets
GROUP BY model_id, model_version
