//! The Unsloth bounties: what upstream has, what is still open, and the evidence.
//!
//! Every entry names its upstream issues and PRs and a status, and backs the status with
//! [`Evidence`]: a file of the pinned release ([`PINNED`]) that must contain a given text.
//! `cargo xtask pr --verify-upstream` downloads the pinned wheels, runs every check
//! ([`verify()`]) and writes the outcome to `issue-fixes/upstream-<version>.json`, which is
//! committed; a test holds the registry to it, so a status can only change together with
//! its evidence. What a wheel cannot show (notebooks, installers) is said in `open`, not
//! checked.
//!
//! [`apply`] applies a bounty's patch series to an upstream checkout with git2 (clean
//! checkout required, whole series checked before anything is written, one commit per
//! patch), [`mod@verify`] runs the series' checks and [`draft`] writes the PR text from their
//! records; `cargo xtask pr <slug>` drives all three.
//! [`submit`] publishes the branch to the user's fork and opens a draft PR
//! (`cargo xtask pr <slug> --submit`): octocrab over rustls, GitHub's Git Data API
//! instead of a git push (no OpenSSL), the token in a [`token::Token`] that never prints,
//! and a re-run that reuses the fork, branch and PR. [`series`] reads the local branch
//! into what is published. Its tests run against a mock GitHub API on 127.0.0.1.
//!
//! | module | what |
//! |---|---|
//! | [`apply`] | git2: patch series onto a clean checkout, one commit per patch |
//! | [`draft`] | the PR's title and body |
//! | [`series`] | a local branch's commits as file changes, and the base they need |
//! | [`submit`] | fork, publish (blobs, trees, commits, ref), draft PR; dry run |
//! | [`token`] | the GitHub token, printed as `***`, scrubbed from every text |
//! | [`verify`](mod@verify) | a series' checks (`verify.json`): CPU checks run here, GPU checks run here or read from a recorded device run |
//!
//! Patch series live in `issue-fixes/patches/<slug>/`, each with its checks (`verify.json`,
//! run by `cargo xtask pr <slug>` before it drafts the PR) and the story of the GPU run that
//! verified it (`VERIFICATION.md`; scripts and recorded runs in `issue-fixes/verify/`). A
//! bounty's [`Bounty::repo`] says which upstream repository its series goes to.
//!
//! ```
//! let open: Vec<_> = issue_fixes::registry().iter().filter(|b| b.status != issue_fixes::Status::Solved).collect();
//! assert!(open.iter().any(|b| b.slug == "flex-attention-dynamic"));
//! ```
#![deny(missing_docs)]

pub mod apply;
pub mod draft;
pub mod series;
pub mod submit;
pub mod token;
pub mod verify;

use std::path::Path;

use serde::Serialize;

/// The release the statuses are checked against (both packages, from PyPI).
pub const PINNED: &str = "2026.10.9";

/// Which wheel a file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Package {
    /// `unsloth`
    Unsloth,
    /// `unsloth_zoo`
    UnslothZoo,
}

impl Package {
    /// The PyPI name.
    pub fn pypi(self) -> &'static str {
        match self {
            Package::Unsloth => "unsloth",
            Package::UnslothZoo => "unsloth_zoo",
        }
    }

    /// Its repository under `unslothai/` on GitHub.
    pub fn github_repo(self) -> &'static str {
        match self {
            Package::Unsloth => "unsloth",
            Package::UnslothZoo => "unsloth-zoo",
        }
    }
}

/// Where things stand upstream in the pinned release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Upstream solved it; nothing of ours to add.
    Solved,
    /// Upstream solved part; `open` says what is left.
    PartlyOpen,
    /// Still open upstream.
    Open,
}

/// A check that a file of the pinned release contains a text.
#[derive(Debug, Clone, Serialize)]
pub struct Evidence {
    /// The wheel.
    pub package: Package,
    /// Path inside the wheel, e.g. `unsloth/save.py`.
    pub path: &'static str,
    /// Text the file must contain.
    pub needle: &'static str,
    /// What its presence shows.
    pub shows: &'static str,
}

/// One bounty.
#[derive(Debug, Clone, Serialize)]
pub struct Bounty {
    /// Short id used on the command line (`cargo xtask pr <slug>`).
    pub slug: &'static str,
    /// The bounty's title.
    pub title: &'static str,
    /// Upstream issues (`unslothai/unsloth` unless noted in `summary`).
    pub issues: &'static [u32],
    /// Upstream pull requests.
    pub prs: &'static [u32],
    /// Status in [`PINNED`].
    pub status: Status,
    /// What upstream has.
    pub summary: &'static str,
    /// What is still open (empty when solved).
    pub open: &'static str,
    /// Checks that back the summary.
    pub evidence: &'static [Evidence],
    /// The repository its patch series goes to (its pull request's base); the issue numbers
    /// stay `unslothai/unsloth`'s.
    pub repo: Package,
}

use Package::{Unsloth, UnslothZoo};

const REGISTRY: &[Bounty] = &[
    Bounty {
        slug: "tool-calling-example",
        repo: Unsloth,
        title: "Tool-calling fine-tuning notebook",
        issues: &[1400],
        prs: &[],
        status: Status::Open,
        summary: "Training code understands tool-call chat templates (it maps them to templates TRL accepts for `tools=`).",
        open: "No example that fine-tunes a model on tool-call conversations and shows it emits well-formed calls afterwards and not before (notebooks are not in the wheel and were not checked here).",
        evidence: &[Evidence {
            package: Unsloth,
            path: "unsloth/models/_trl_tool_templates.py",
            needle: "def patch_trl_tool_chat_templates",
            shows: "tool-call chat templates are supported in training",
        }],
    },
    Bounty {
        slug: "gguf-vision-export",
        repo: Unsloth,
        title: "GGUF export of vision models",
        issues: &[1559],
        prs: &[3356],
        status: Status::PartlyOpen,
        summary: "Vision models export to GGUF as the text model plus an `-mmproj` projector file.",
        open: "An Ollama Modelfile for vision exports (the Modelfile writer does not reference the projector).",
        evidence: &[Evidence {
            package: Unsloth,
            path: "unsloth/save.py",
            needle: "-mmproj",
            shows: "GGUF export handles the mmproj projector file",
        }],
    },
    Bounty {
        slug: "attention-refactor",
        repo: Unsloth,
        title: "Attention refactor across xformers / SDPA / flash / flex",
        issues: &[4286, 4631],
        prs: &[3566, 6828],
        status: Status::PartlyOpen,
        summary: "One dispatcher selects the backend; on sm_120 it probes xformers with a real forward instead of disabling it by version (PR #6828 closed #4631), and xformers' FA3 mis-dispatch (xformers <= 0.0.32.post2) is guarded at sm 10.0, 11.0 and 12.0.",
        open: "xformers' FA3 mis-dispatch guard misses GPUs above sm_90: it names sm 10.0, 11.0 and 12.0 where xformers' bug covers every capability above 9.0, so B300 (sm_103), Thor on CUDA 12 (sm_101) and GB10 / DGX Spark (sm_121) keep a broken xformers, and at sm_10x nothing probes it before it is selected.",
        evidence: &[
            Evidence {
                package: Unsloth,
                path: "unsloth/utils/attention_dispatch.py",
                needle: "def select_attention_backend",
                shows: "the attention dispatcher (PR #3566)",
            },
            Evidence {
                package: Unsloth,
                path: "unsloth/utils/attention_dispatch.py",
                needle: "capability[0] >= 12",
                shows: "the sm_120 runtime probe of xformers (PR #6828, closes #4631)",
            },
            Evidence {
                package: Unsloth,
                path: "unsloth/models/_utils.py",
                needle: "def _xformers_fa3_lacks_sm90a",
                shows: "FA3 turned off on H100 for xformers builds without sm_90a kernels (#3963)",
            },
            Evidence {
                package: Unsloth,
                path: "unsloth/models/_utils.py",
                needle: "in (\"10.0\", \"11.0\", \"12.0\")",
                shows: "the guard against xformers <= 0.0.32.post2 running sm_90a kernels above sm_90 lists three capabilities (what is open)",
            },
        ],
    },
    Bounty {
        slug: "windows",
        repo: Unsloth,
        title: "Windows support",
        issues: &[1359, 1995],
        prs: &[1841],
        status: Status::Solved,
        summary: "Windows code paths at import and for safetensors I/O.",
        open: "",
        evidence: &[
            Evidence {
                package: Unsloth,
                path: "unsloth/__init__.py",
                needle: "platform.system() == \"Windows\"",
                shows: "a Windows branch at import",
            },
            Evidence {
                package: Unsloth,
                path: "unsloth/models/_windows_safetensors.py",
                needle: "sys.platform == \"win32\"",
                shows: "Windows-specific safetensors handling",
            },
        ],
    },
    Bounty {
        slug: "sequence-classification",
        repo: Unsloth,
        title: "Sequence classification",
        issues: &[1561],
        prs: &[2263, 2710],
        status: Status::Solved,
        summary: "Models load for sequence classification, with PEFT.",
        open: "",
        evidence: &[Evidence {
            package: Unsloth,
            path: "unsloth/models/llama.py",
            needle: "PeftModelForSequenceClassification",
            shows: "sequence-classification models are wrapped with PEFT",
        }],
    },
    Bounty {
        slug: "vlm-data-collator",
        repo: UnslothZoo,
        title: "VLM data collator",
        issues: &[1559, 2133],
        prs: &[],
        status: Status::PartlyOpen,
        summary: "`UnslothVisionDataCollator` batches image and text conversations.",
        open: "Batching efficiency (#2133): group image and text-only rows so no batch pays for a vision pass it does not need.",
        evidence: &[Evidence {
            package: UnslothZoo,
            path: "unsloth_zoo/vision_utils.py",
            needle: "class UnslothVisionDataCollator",
            shows: "the vision data collator",
        }],
    },
    Bounty {
        slug: "vlm-image-resizing",
        repo: UnslothZoo,
        title: "VLM image resizing",
        issues: &[],
        prs: &[267],
        status: Status::Solved,
        summary: "The collator resizes images (`resize=`, default \"min\"); the PR is unsloth_zoo #267.",
        open: "",
        evidence: &[Evidence {
            package: UnslothZoo,
            path: "unsloth_zoo/vision_utils.py",
            needle: "resize = \"min\"",
            shows: "the collator's resize argument",
        }],
    },
    Bounty {
        slug: "flex-attention-dynamic",
        repo: UnslothZoo,
        title: "Flex attention for dynamic sequence lengths",
        issues: &[1561],
        prs: &[1960, 2162],
        status: Status::Open,
        summary: "unsloth_zoo caches compiled block masks; the PRs that make flex attention take varying lengths without recompiling (unslothai/unsloth#1960, unslothai/unsloth#2162) are still open.",
        open: "Flex attention over dynamic lengths (causal, padded, packed) without recompiling as lengths change, equal to SDPA within bf16 tolerance: the release has no padded or packed (document) mask, and on torch 2.11 compiles flex_attention three times and create_block_mask twice over varying lengths.",
        evidence: &[Evidence {
            package: UnslothZoo,
            path: "unsloth_zoo/flex_attention/utils.py",
            needle: "def create_block_mask_cached",
            shows: "block masks are cached (not the dynamic-length fix)",
        }],
    },
];

/// Every bounty.
pub fn registry() -> &'static [Bounty] {
    REGISTRY
}

/// A bounty by slug.
pub fn find(slug: &str) -> Option<&'static Bounty> {
    REGISTRY.iter().find(|b| b.slug == slug)
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Outcome {
    /// `package/path`.
    pub file: String,
    /// The needle.
    pub needle: String,
    /// `found`, `absent` (file there, text not), or `no such file`.
    pub result: String,
}

/// Runs one check against extracted wheels: `root/<path>` (paths start with the package's
/// import name, so one folder can hold both wheels).
pub fn check(root: &Path, e: &Evidence) -> Outcome {
    let result = match std::fs::read(root.join(e.path)) {
        Err(_) => "no such file".to_string(),
        Ok(bytes) => {
            let found = String::from_utf8_lossy(&bytes).contains(e.needle);
            if found { "found" } else { "absent" }.to_string()
        }
    };
    Outcome { file: format!("{}:{}", e.package.pypi(), e.path), needle: e.needle.to_string(), result }
}

/// Runs every check of every bounty; returns (slug, outcomes).
pub fn verify(root: &Path) -> Vec<(String, Vec<Outcome>)> {
    REGISTRY.iter().map(|b| (b.slug.to_string(), b.evidence.iter().map(|e| check(root, e)).collect())).collect()
}
