// The playground's layout: the sign-in form, the nav of pages (chosen by the URL's fragment,
// #/image, #/chat, ...), the signed-in user with the balance, and sign-out.

import * as api from './api.js';
import { PAGES } from './pages.js';
import { el } from './ui.js';

const $ = (id) => document.getElementById(id);

async function refreshBalance() {
  try {
    const account = await api.account();
    $('balance').textContent = account.premium ? `${account.balance} (premium)` : account.balance;
  } catch (err) {
    if (err.status === 401) showSignIn();
  }
}

function showSignIn(message = '') {
  $('sign-in').hidden = false;
  $('page').hidden = true;
  $('nav').hidden = true;
  $('who').hidden = true;
  $('sign-in-error').textContent = message;
  $('page').replaceChildren();
}

function route() {
  if (!$('sign-in').hidden) return;
  const wanted = location.hash.replace(/^#\/?/, '') || PAGES[0][0];
  const [id, , render] = PAGES.find(([name]) => name === wanted) || PAGES[0];
  for (const link of $('nav').children) {
    if (link.dataset.page === id) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const page = $('page');
  page.replaceChildren();
  page.dataset.page = id;
  render(page, { refreshBalance });
}

function showSignedIn(session) {
  $('sign-in').hidden = true;
  $('page').hidden = false;
  $('nav').hidden = false;
  $('who').hidden = false;
  $('user').textContent = session.user;
  $('balance').textContent = session.account.premium ? `${session.account.balance} (premium)` : session.account.balance;
  route();
}

async function start() {
  $('nav').replaceChildren(...PAGES.map(([id, title]) => el('a', { href: `#/${id}`, text: title, 'data-page': id })));
  $('sign-in-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const data = new FormData(event.target);
    try {
      const session = await api.signIn(data.get('name'), data.get('password'));
      event.target.reset();
      showSignedIn(session);
    } catch (err) {
      $('sign-in-error').textContent = err.message;
    }
  });
  $('sign-out').addEventListener('click', async () => {
    try {
      await api.signOut();
    } finally {
      showSignIn('Signed out.');
    }
  });
  window.addEventListener('hashchange', route);
  const session = await api.currentSession().catch(() => null);
  if (session) showSignedIn(session);
  else showSignIn();
}

start();
