/// Splits `total_uj` among requests in proportion to `tokens`, exactly: the shares always add up
/// to `total_uj`. Integer shares are floored and the leftover microjoules go, one each, to the
/// largest fractional remainders (ties to the earlier request), so no rounding error accumulates
/// in what the operator sums. When no request processed a token, the batch is shared equally.
pub fn split_by_tokens(total_uj: u64, tokens: &[u64]) -> Vec<u64> {
    if tokens.is_empty() {
        return Vec::new();
    }
    let token_sum: u128 = tokens.iter().map(|&t| u128::from(t)).sum();
    let (weights, weight_sum): (Vec<u128>, u128) = if token_sum == 0 {
        (vec![1; tokens.len()], tokens.len() as u128)
    } else {
        (tokens.iter().map(|&t| u128::from(t)).collect(), token_sum)
    };
    let total = u128::from(total_uj);
    let mut shares = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (i, w) in weights.iter().enumerate() {
        let scaled = total * w;
        // Shares never exceed total_uj, so they fit in u64.
        shares.push((scaled / weight_sum) as u64);
        remainders.push((scaled % weight_sum, i));
    }
    let leftover = total_uj - shares.iter().sum::<u64>();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(leftover as usize) {
        shares[i] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_tokens_and_add_up() {
        let shares = split_by_tokens(1_000_000, &[1, 3]);
        assert_eq!(shares, vec![250_000, 750_000]);
        let shares = split_by_tokens(10, &[1, 1, 1]);
        assert_eq!(shares.iter().sum::<u64>(), 10);
        assert_eq!(shares, vec![4, 3, 3]);
    }

    #[test]
    fn zero_tokens_share_equally() {
        assert_eq!(split_by_tokens(9, &[0, 0, 0]), vec![3, 3, 3]);
    }

    #[test]
    fn sums_are_exact_for_awkward_numbers() {
        let tokens = [7, 13, 1, 0, 999, 42, 5];
        for total in [0, 1, 6, 997, 123_456_789, u64::MAX / 2] {
            let shares = split_by_tokens(total, &tokens);
            assert_eq!(shares.iter().sum::<u64>(), total, "total {total}");
            assert_eq!(shares[3], 0, "a request with no tokens gets no energy");
        }
    }

    #[test]
    fn no_requests_no_shares() {
        assert!(split_by_tokens(5, &[]).is_empty());
    }
}
