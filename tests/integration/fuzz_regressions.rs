//! Inputs found by the fuzz targets in `fuzz/` (see `fuzz/README.md`), each once a crash, hang or
//! out-of-memory, now a typed error.

use mixtral::config::{ConfigError, ModelConfig};
use mixtral::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes each thread has live and the most it has had, so that a
/// test can bound the memory one render takes (a render runs on the calling thread).
struct CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: nothing to count while the thread's locals are being torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn as_delta(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is forwarded to `System` unchanged; the counting only reads the layouts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(as_delta(layout.size()));
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(as_delta(layout.size()));
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-as_delta(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(as_delta(new_size) - as_delta(layout.size()));
        }
        new
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f`, returning its result, the most memory it had allocated at once on this thread beyond
/// what was live before, and its run time.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let began = Instant::now();
    let result = f();
    let elapsed = began.elapsed();
    let peak = PEAK.with(Cell::get);
    (
        result,
        usize::try_from(peak.saturating_sub(start)).unwrap_or(0),
        elapsed,
    )
}

/// `config.json` of `models/tiny-mixtral` with `edits` applied.
fn tiny_config_with(edits: &[(&str, serde_json::Value)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (key, value) in edits {
        json[*key] = value.clone();
    }
    json.to_string()
}

/// Found by `config` (a timeout on the seed `fuzz/corpus/config/limits.json`): 4096 layers of
/// 4096 experts each passed every per-field limit, and the weight layout built from it listed 50
/// million tensors before any checkpoint was read. The product is now bounded.
#[test]
fn too_many_expert_mlps_in_all_is_refused() {
    let text = tiny_config_with(&[
        ("num_hidden_layers", 4096.into()),
        ("num_local_experts", 4096.into()),
    ]);
    let err = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Invalid {
                field: "num_local_experts",
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("config.json") && message.contains("4096"),
        "{message}"
    );

    // The largest released shapes stay accepted: 56 layers of 8 experts (Mixtral-8x22B), and
    // the bound itself.
    for (layers, experts) in [(56, 8), (4096, 16), (16, 4096)] {
        let text = tiny_config_with(&[
            ("num_hidden_layers", layers.into()),
            ("num_local_experts", experts.into()),
        ]);
        let config = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap();
        assert_eq!((config.num_layers, config.num_experts), (layers, experts));
    }
    let text = tiny_config_with(&[
        ("num_hidden_layers", 4096.into()),
        ("num_local_experts", 17.into()),
    ]);
    assert!(ModelConfig::from_json_str(&text, Path::new("config.json")).is_err());
}

/// Found by hand beside the `chat_template` target (`fuzz/README.md`): nested loops of 10^10
/// iterations hung the render. Each render now has a bounded instruction budget, so the template
/// fails with a typed error instead.
#[test]
fn a_runaway_chat_template_fails_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    std::fs::copy(
        tiny.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let template =
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\
                    {{ messages[0].content }}";
    let config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = Tokenizer::from_dir(dir.path()).expect("the template compiles");
    let err = tokenizer
        .render_chat(&[ChatMessage::user("hello".to_string())])
        .unwrap_err();
    eprintln!("{err}");
    assert!(err.to_string().contains("fuel"), "{err}");
    // An ordinary template still renders under the budget.
    let ok = Tokenizer::from_dir(&tiny).unwrap();
    let text = ok
        .render_chat(&[ChatMessage::user("hello".to_string())])
        .unwrap();
    assert!(text.contains("hello"));
}

/// The shipped tokenizer with `source` as its chat template.
fn with_template(source: &str) -> Tokenizer {
    let json = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral/tokenizer.json");
    let mut tokenizer = Tokenizer::from_files(&json, None, None).expect("tokenizer.json loads");
    tokenizer
        .set_chat_template(source.to_string(), Path::new("chat_template.jinja"))
        .expect("the template compiles");
    tokenizer
}

/// Most memory one render may take here: twice the 64 MB of data its budget pays for.
const RENDER_MEMORY: usize = 128 << 20;

/// Renders `messages`, asserting that the render stayed within [`RENDER_MEMORY`] and took at most
/// 20 s (a budget-exhausting render takes well under a second; the margin is for a loaded machine).
fn render_bounded(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<String, TokenizerError> {
    let (result, peak, elapsed) = measured(|| tokenizer.render_chat(messages));
    eprintln!("render: at most {peak} bytes at once, {elapsed:?}");
    assert!(
        peak <= RENDER_MEMORY,
        "the render took {peak} bytes at once (at most {RENDER_MEMORY})"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "the render took {elapsed:?}"
    );
    result
}

/// A render error saying the budget ran out.
fn assert_out_of_budget(result: Result<String, TokenizerError>) {
    match result {
        Err(TokenizerError::Render { message }) => {
            assert!(message.contains("fuel"), "{message}")
        }
        other => panic!("expected the render to run out of its budget, got {other:?}"),
    }
}

fn hello() -> Vec<ChatMessage> {
    vec![ChatMessage::user("hello")]
}

/// The known hostile template (`fuzz/README.md`): a string doubled in a loop. minijinja's budget
/// also charges the bytes a template creates, and checks a concatenation's size before making it,
/// so the render stops at the budget's 64 MB instead of allocating until the process dies (with
/// the earlier budget of 20 million it reached 1.3 GB, and 2 s). String repetition is checked the
/// same way.
#[test]
fn a_string_doubled_in_a_loop_stops_within_the_render_budget() {
    for template in [
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}\
         {% endfor %}{{ ns.s | length }}",
        "{{ ('x' * 1000000000) | length }}",
    ] {
        let tokenizer = with_template(template);
        assert_out_of_budget(render_bounded(&tokenizer, &hello()));
    }
    // Doubling a few times is ordinary work and still renders.
    let tokenizer = with_template(
        "{% set ns = namespace(s='ab') %}{% for i in range(10) %}{% set ns.s = ns.s ~ ns.s %}\
         {% endfor %}{{ ns.s | length }}",
    );
    assert_eq!(render_bounded(&tokenizer, &hello()).unwrap(), "2048");
}

/// `str.replace` (the crate's Python method) builds `len(s) * len(new)` bytes from two strings the
/// template paid little for; minijinja charges a method's result only once it exists, so the
/// result's size is now charged before it is built. Before, this one asked for 10 GB (and the
/// process aborted when an allocation failed).
#[test]
fn str_replace_is_charged_before_its_result_is_built() {
    let tokenizer =
        with_template("{% set b = 'b' * 100000 %}{{ ('a' * 100000).replace('a', b) | length }}");
    assert_out_of_budget(render_bounded(&tokenizer, &hello()));

    let tokenizer = with_template("{{ messages[0].content.replace('l', 'LL') }}");
    assert_eq!(render_bounded(&tokenizer, &hello()).unwrap(), "heLLLLo");
}

/// `str.split` makes a list slot per piece, 24 bytes for each 2 bytes of a string of one-letter
/// words; charged before the list is built (before, this one took 420 MB at once).
#[test]
fn str_split_is_charged_before_its_list_is_built() {
    let tokenizer = with_template("{% set s = ' a' * 10000000 %}{{ s.split() | length }}");
    assert_out_of_budget(render_bounded(&tokenizer, &hello()));
    let tokenizer = with_template("{% set s = ',a' * 10000000 %}{{ s.split(',') | length }}");
    assert_out_of_budget(render_bounded(&tokenizer, &hello()));

    let tokenizer =
        with_template("{{ ' a  b c '.split() | join('|') }}/{{ 'a,,b'.split(',') | join('|') }}");
    assert_eq!(render_bounded(&tokenizer, &hello()).unwrap(), "a|b|c/a||b");
}

/// Looking up `message.content` costs the template no budget, so it must not copy the content:
/// with a 1 MB message this list of 100,000 lookups asked for 100 GB when each lookup made a copy.
#[test]
fn message_lookups_share_the_content_instead_of_copying_it() {
    let tokenizer = with_template(
        "{{ (messages * 100000) | map(attribute='content') | list | length }}\
         {{ messages[0]['content'] | length }}{{ messages[0].items() | list | length }}",
    );
    let messages = [ChatMessage::user("x".repeat(1 << 20))];
    let text = render_bounded(&tokenizer, &messages).unwrap();
    assert_eq!(text, format!("100000{}2", 1 << 20));
}

/// The rendered text is bounded (4 MiB): encoding a longer one would take gigabytes.
#[test]
fn a_render_longer_than_4_mib_fails() {
    let tokenizer = with_template("{% for i in range(50000) %}{{ 'x' * 100 }}{% endfor %}");
    match render_bounded(&tokenizer, &hello()) {
        Err(TokenizerError::Render { message }) => {
            assert!(message.contains("longer than 4194304 bytes"), "{message}")
        }
        other => panic!("expected a too-long render, got {other:?}"),
    }
    // Just under the bound renders.
    let tokenizer = with_template("{% for i in range(41000) %}{{ 'x' * 100 }}{% endfor %}");
    assert_eq!(
        render_bounded(&tokenizer, &hello()).unwrap().len(),
        4_100_000
    );
}

/// The budget leaves ordinary chats far more room than a context holds: 2,000 messages of 1,000
/// bytes (about 500k tokens) render with the shipped Mixtral template, exactly as the built-in
/// format writes them.
#[test]
fn a_long_ordinary_chat_renders_within_the_budget() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-mixtral");
    let shipped = Tokenizer::from_dir(&tiny).unwrap();
    let fallback = Tokenizer::from_files(&tiny.join("tokenizer.json"), None, None).unwrap();
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|i| {
            let content = format!("{i:04} {}", "word ".repeat(199));
            if i % 2 == 0 {
                ChatMessage::user(content)
            } else {
                ChatMessage::assistant(content)
            }
        })
        .collect();
    let text = render_bounded(&shipped, &messages).unwrap();
    assert!(text.len() > 2_000_000, "{}", text.len());
    assert_eq!(text, fallback.render_chat(&messages).unwrap());
}
