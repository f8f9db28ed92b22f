//! What applications record: inference events and user feedback.

/// One inference of a model, as the application saw it. Values outside a
/// histogram's range are clipped into its first or last bucket.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InferenceEvent<'a> {
    /// Wall time of the inference, milliseconds.
    pub latency_ms: f64,
    /// Input size, tokens (or any size unit the model has).
    pub input_tokens: u32,
    /// Output size, tokens.
    pub output_tokens: u32,
    /// Confidence of the output, 0 to 1, if the model has one.
    pub confidence: Option<f64>,
    /// Whether the inference failed.
    pub error: bool,
    /// Predicted label, counted in the `label` categorical feature when the
    /// model declares one; labels outside the declared set count as `other`.
    pub label: Option<&'a str>,
    /// Values of the model's custom numeric features, in the order the
    /// model declares them ([`crate::window::ModelSpec::custom`]); NaN, or a
    /// missing trailing value, means "no value" and is not counted.
    pub custom: &'a [f64],
}

/// User feedback on a model's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Positive,
    Negative,
    Correction,
}
