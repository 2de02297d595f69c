//! A request as the scheduler sees it: token ids, stop conditions and progress.

use weave_block_manager::BlockHash;

/// Caller-chosen request id, unique among unfinished requests.
pub type RequestId = u64;

/// What a caller submits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Sampling this token finishes the request (unless `ignore_eos`).
    pub eos_token_id: Option<u32>,
    pub ignore_eos: bool,
    /// Sampling any of these finishes the request.
    pub stop_token_ids: Vec<u32>,
    /// Used by the priority policy: lower runs first.
    pub priority: i32,
}

impl NewRequest {
    /// A request with no stop tokens and priority 0.
    pub fn new(id: RequestId, prompt: Vec<u32>, max_tokens: usize) -> Self {
        NewRequest {
            id,
            prompt,
            max_tokens,
            eos_token_id: None,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            priority: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` outputs, or `max_model_len` tokens in all.
    Length,
    /// EOS or a stop token was sampled, or the caller saw a stop string.
    Stop,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        }
    }
}

/// A request that left the scheduler, with everything it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedRequest {
    pub id: RequestId,
    pub reason: FinishReason,
    pub num_prompt_tokens: usize,
    pub output_tokens: Vec<u32>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub num_cached_tokens: usize,
    pub num_preemptions: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Waiting,
    Running,
    Preempted,
}

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub id: RequestId,
    /// Prompt followed by outputs so far.
    pub tokens: Vec<u32>,
    pub num_prompt_tokens: usize,
    pub max_tokens: usize,
    pub eos_token_id: Option<u32>,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub priority: i32,
    /// Admission order, for FCFS ties and priority ties.
    pub arrival_seq: u64,
    pub num_computed_tokens: usize,
    pub status: Status,
    pub block_hashes: Vec<BlockHash>,
    pub num_cached_tokens: Option<usize>,
    pub num_preemptions: u32,
}

impl Request {
    pub fn from_new(r: NewRequest, arrival_seq: u64, block_size: usize) -> Self {
        let mut block_hashes = Vec::new();
        weave_block_manager::extend_block_hashes(&mut block_hashes, &r.prompt, block_size);
        Request {
            id: r.id,
            num_prompt_tokens: r.prompt.len(),
            tokens: r.prompt,
            max_tokens: r.max_tokens,
            eos_token_id: r.eos_token_id,
            ignore_eos: r.ignore_eos,
            stop_token_ids: r.stop_token_ids,
            priority: r.priority,
            arrival_seq,
            num_computed_tokens: 0,
            status: Status::Waiting,
            block_hashes,
            num_cached_tokens: None,
            num_preemptions: 0,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn num_output_tokens(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }
    /// A decode step computes the one token sampled last step; anything else is a prefill
    /// (a prompt chunk, or the recompute of a resumed request).
    pub fn is_decoding(&self) -> bool {
        self.num_output_tokens() > 0 && self.num_computed_tokens + 1 == self.num_tokens()
    }
}
