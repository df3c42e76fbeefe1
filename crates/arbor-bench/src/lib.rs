//! `arbor bench`: runs multi-turn and shared-context workloads against OpenAI-compatible
//! servers (Arbor, vLLM, SGLang, llama.cpp) and says which is faster, judged against
//! run-to-run noise.
//!
//! | module     | owns |
//! |------------|------|
//! | `client`   | the streaming OpenAI client that measures one request; target specs |
//! | `workload` | the workloads (reference, multi-turn, branching, shared-prefix, one-shot, custom) |
//! | `runner`   | running a workload against one target: concurrency, arrivals, records |
//! | `stats`    | rows, percentiles, throughput and the noise-aware verdicts |
//! | `report`   | results files, terminal tables, the HTML report |
//! | `svg`      | the report's charts |
//! | `cli`      | the command line and the run loop |

pub mod cli;
pub mod client;
pub mod report;
pub mod runner;
pub mod stats;
pub mod svg;
pub mod workload;

pub use cli::{BenchArgs, BenchCommand};
