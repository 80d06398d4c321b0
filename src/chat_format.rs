//! Prompt formats of the ChatGLM family.

/// The official ChatGLM2 `build_prompt`:
/// `[Round N]\n\n问：{query}\n\n答：{response}\n\n` per past turn, then the open turn.
pub fn build_prompt(query: &str, history: &[(String, String)]) -> String {
    let mut prompt = String::new();
    for (i, (q, a)) in history.iter().enumerate() {
        prompt.push_str(&format!("[Round {}]\n\n问：{}\n\n答：{}\n\n", i + 1, q, a));
    }
    prompt.push_str(&format!("[Round {}]\n\n问：{}\n\n答：", history.len() + 1, query));
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_numbered_from_one() {
        let h = vec![("q1".to_string(), "a1".to_string())];
        assert_eq!(build_prompt("q2", &h), "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：");
        assert_eq!(build_prompt("hi", &[]), "[Round 1]\n\n问：hi\n\n答：");
    }
}
