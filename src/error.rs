//! The crate's one error type.

/// Everything a caller of this crate can get wrong, or that the device can refuse.
///
/// No public function panics on bad input: it returns one of these instead, and
/// leaves the parameters and the velocity on the GPU exactly as they were (a
/// [`Error::Timeout`] says where work already queued may still change them).
/// New kinds of error may come in later versions: match with a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No wgpu adapter matched the request.
    #[error(
        "no GPU adapter found ({detail}). Install a Vulkan driver; without a GPU, the software \
         one: `apt-get install -y mesa-vulkan-drivers`"
    )]
    NoAdapter {
        /// What was asked for and what was seen.
        detail: String,
    },
    /// The adapter was found but refused to open a device.
    #[error("could not open a device on the adapter: {0}")]
    RequestDevice(String),
    /// The parameter vector (or a tensor of it) has no elements.
    #[error("parameters are empty: {0}")]
    EmptyParameters(String),
    /// A slice given for a vector of `expected` elements had `got`.
    #[error("length mismatch for {what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        /// Which vector was being written or read.
        what: String,
        /// Elements the optimizer holds.
        expected: usize,
        /// Elements the caller gave.
        got: usize,
    },
    /// A configuration value is outside its domain.
    #[error("invalid option {option} = {value}: {reason}")]
    InvalidOption {
        /// The option's name as in jaxopt (`momentum`, `delta`, ...).
        option: &'static str,
        /// The offending value, printed.
        value: String,
        /// What the domain is.
        reason: &'static str,
    },
    /// A variant name other than `SPS_max` or `SPS+`.
    #[error("unknown variant {0:?}: expected \"SPS_max\" or \"SPS+\"")]
    UnknownVariant(String),
    /// A tensor name that the optimizer does not hold, or that is given twice.
    #[error("tensor {0:?}: {1}")]
    Tensor(String, &'static str),
    /// A user-owned buffer failed a check at registration, or lacks a usage an
    /// operation needs.
    #[error("external tensor {tensor:?}: {reason}")]
    Registration {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A step was refused because its loss, squared gradient norm or step size is
    /// not finite (policy [`crate::NonFinitePolicy::Refuse`]). Parameters and velocity
    /// are unchanged.
    #[error(
        "step {iter_num} refused: non-finite value {value}, squared gradient norm {sqnorm} or \
         step size {stepsize}; parameters and velocity are unchanged"
    )]
    NonFinite {
        /// Number of updates done before the refused one.
        iter_num: usize,
        /// The loss at the current parameters.
        value: f64,
        /// The squared gradient norm at the current parameters.
        sqnorm: f64,
        /// The step size computed from them.
        stepsize: f64,
    },
    /// A step was refused because its update would write a NaN or an infinity into
    /// the parameters or the velocity although its loss, norm and step size are
    /// finite: an overflow, or parameters or velocity already non-finite (checked
    /// only with [`crate::PolyakConfig::check_overflow`]). Parameters and velocity
    /// are unchanged.
    #[error(
        "step {iter_num} refused: with step size {stepsize} the update would write a \
         non-finite parameter or velocity (it stays finite for step sizes in \
         [{lowest}, {highest}], an empty range if one is already NaN or infinite); \
         parameters and velocity are unchanged"
    )]
    NonFiniteUpdate {
        /// Number of updates done before the refused one.
        iter_num: usize,
        /// The step size computed for it.
        stepsize: f64,
        /// The smallest step size the check lets through.
        lowest: f64,
        /// The largest step size the check lets through.
        highest: f64,
    },
    /// The objective (the caller's closure or model) could not evaluate: for it to
    /// return, e.g. on a batch it cannot use; the step is then not taken and the
    /// parameters stay as they were. The library never makes this error itself.
    #[error("the objective failed: {0}")]
    Objective(String),
    /// `run_iterator` was given an iterator with no batch at all.
    #[error("run_iterator needs at least one batch (the first goes to init_state)")]
    EmptyIterator,
    /// The device could not allocate the optimizer's buffers.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// Mapping a buffer for reading failed, or a device operation failed.
    #[error("device error: {0}")]
    Device(String),
    /// The GPU did not finish the submitted work within the context's wait timeout
    /// ([`crate::ContextOptions::wait_timeout`]): a kernel that never ends, or work
    /// longer than the limit. The work stays queued and may still complete, with
    /// its effects (under [`crate::StepSizeMode::Device`] a step's update is part of
    /// it).
    #[error(
        "the GPU did not finish within {0:?} (ContextOptions::wait_timeout): a kernel \
         that never ends, or work longer than that; it stays queued and may still complete"
    )]
    Timeout(std::time::Duration),
    /// wgpu rejected a command: of a step, most likely one the objective recorded (a
    /// copy, binding or dispatch it does not allow), or of a transfer or an update on
    /// a user buffer that was destroyed. Nothing of those commands ran, and the
    /// parameters stay as they were.
    #[error(
        "wgpu rejected the commands (most likely the objective's, or on a destroyed user buffer): {0}"
    )]
    Validation(String),
    /// A checkpoint could not be written, read, or does not fit this optimizer
    /// (nothing was uploaded).
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint's path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A conformance data file could not be read or parsed.
    #[error("conformance data: {0}")]
    Data(String),
}

/// Shorthand used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
